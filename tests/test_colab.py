"""Opening the kit on Colab: one URL, one bootstrap cell, the T4 runtime request, badges; the end-to-end notebook;
Drive before the run guard; bf16 as the trainer decides it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import nbformat
import pytest
import yaml

from helpers import environment
from helpers.colab import BOOTSTRAP_CELL, badges_markdown, colab_url, github_path
from helpers.paths import kit_repo
from helpers.config import RunConfig, notebook_config
from helpers.pipeline import notebook_parameter_names, run_notebook
from helpers.paths import NOTEBOOKS, PROFILES, PROJECT_ROOT
from helpers.records import read_json, read_train_log

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
END_TO_END = NOTEBOOKS / "colab_end_to_end.ipynb"


def cells_after_parameters(path):
    cells = nbformat.read(path, as_version=4).cells
    index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    return cells[index], cells[index + 1]


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_every_notebook_asks_colab_for_a_t4_and_starts_with_the_one_bootstrap_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    params, bootstrap = cells_after_parameters(path)
    assert bootstrap.source == BOOTSTRAP_CELL, f"{path.name}: bootstrap cell drifted; run `python -m helpers.colab`"
    assert f'kit_repo: str = "{kit_repo()}"  # ' in params.source


def test_readme_badges_are_the_ones_made_from_the_kit_url():
    assert badges_markdown(kit_repo()) in (PROJECT_ROOT / "README.md").read_text()


def test_github_urls_are_recognised_and_give_colab_links():
    for url in ("https://github.com/acme/lora-kit", "https://github.com/acme/lora-kit.git", "git@github.com:acme/lora-kit.git"):
        assert github_path(url) == "acme/lora-kit"
    assert github_path("https://gitlab.com/acme/lora-kit") is None and github_path("") is None
    assert colab_url("https://github.com/acme/lora-kit", "01_train_lora.ipynb") == (
        "https://colab.research.google.com/github/acme/lora-kit/blob/main/notebooks/01_train_lora.ipynb")


@pytest.fixture
def kit_copy(tmp_path):
    """A copy of the kit's helpers, notebooks and README to publish in."""
    for name in ("helpers", "notebooks"):
        shutil.copytree(PROJECT_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def publish(kit, *args):
    env = {**os.environ, "PYTHONPATH": str(kit)}
    return subprocess.run([sys.executable, "-m", "helpers.colab", *args], cwd=kit, env=env, capture_output=True,
                          text=True, timeout=120)


def test_one_command_publishes_the_url_into_the_notebooks_the_badges_and_the_config(kit_copy):
    url = "https://github.com/acme/lora-kit"
    result = publish(kit_copy, url)
    assert result.returncode == 0, result.stderr
    assert json.loads((kit_copy / "helpers/data/kit.json").read_text()) == {"kit_repo": url}
    readme = (kit_copy / "README.md").read_text()
    for path in NOTEBOOK_PATHS:
        params, bootstrap = cells_after_parameters(kit_copy / "notebooks" / path.name)
        assert f'kit_repo: str = "{url}"  # ' in params.source and bootstrap.source == BOOTSTRAP_CELL
        assert colab_url(url, path.name) in readme
    assert readme.count("colab-badge.svg") == len(NOTEBOOK_PATHS)
    check = subprocess.run([sys.executable, "-c", "from helpers.config import RunConfig; print(RunConfig().kit_repo)"],
                           cwd=kit_copy, env={**os.environ, "PYTHONPATH": str(kit_copy)}, capture_output=True, text=True)
    assert check.stdout.strip() == url


def test_a_url_colab_cannot_open_is_refused_naming_it(kit_copy):
    result = publish(kit_copy, "https://example.org/kit")
    assert result.returncode == 2 and "'https://example.org/kit' is not a GitHub repository URL" in result.stderr
    assert (kit_copy / "README.md").read_text() == (PROJECT_ROOT / "README.md").read_text()


def test_on_colab_without_a_url_the_bootstrap_stops_with_one_line_saying_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="kit_repo is empty: set it in the parameters cell"):
        exec(BOOTSTRAP_CELL, {"kit_repo": ""})


def test_off_colab_the_bootstrap_does_nothing(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("COLAB_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    exec(BOOTSTRAP_CELL, {"kit_repo": ""})
    assert os.getcwd() == str(tmp_path)


def test_end_to_end_notebook_takes_every_parameter_of_the_stages_it_runs():
    stages = set().union(*(notebook_parameter_names(NOTEBOOKS / f"{name}.ipynb")
                           for name in ("01_train_lora", "02_inference", "03_evaluate", "04_export")))
    missing = stages - {"num_processes", "compare_runs"} - notebook_parameter_names(END_TO_END)
    assert not missing, f"colab_end_to_end.ipynb lacks parameters of the stages it runs: {sorted(missing)}"


def test_an_empty_run_dir_goes_to_drive_on_colab_and_to_outputs_elsewhere(monkeypatch):
    for name in [n for n in os.environ if n.startswith("COLAB_")]:
        monkeypatch.delenv(name)
    assert notebook_config({"run_dir": ""}).run_dir == "outputs/lora-run"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    assert notebook_config({"run_dir": ""}).run_dir == "/content/drive/MyDrive/lora-kit/lora-run"
    assert notebook_config({"run_dir": "outputs/x"}).run_dir == "outputs/x"


def test_drive_is_mounted_before_the_finished_run_guard_looks(monkeypatch, tmp_path):
    import helpers.fine_tuning as fine_tuning

    calls = []
    monkeypatch.setattr(fine_tuning, "check_model_source", lambda name: None)
    monkeypatch.setattr(fine_tuning, "mount_drive_if_needed", lambda run_dir: calls.append("mount"))
    monkeypatch.setattr(fine_tuning, "check_run_dir", lambda config, data: calls.append("guard") or tmp_path / "run")
    fine_tuning.prepare_run(RunConfig(run_dir=str(tmp_path / "run"), precision="fp32"))
    assert calls == ["mount", "guard"]


def fake_cuda(monkeypatch, emulated_bf16: bool):
    """torch.cuda as on a T4: CUDA present, bf16 only emulated (torch's default check says yes)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated_bf16 and including_emulation)


def test_a_t4_trains_in_fp16_and_setup_says_it_has_no_bf16(monkeypatch):
    fake_cuda(monkeypatch, emulated_bf16=True)
    assert environment.bf16_supported() is False
    assert environment.resolve_precision("auto") == "fp16"
    with pytest.raises(ValueError, match="precision 'bf16' is not supported"):
        monkeypatch.setattr("torch.cuda.get_device_name", lambda index=0: "Tesla T4")
        environment.resolve_precision("bf16")


@pytest.mark.notebook
def test_end_to_end_notebook_trains_answers_evaluates_and_exports_in_one_kernel(tmp_path):
    # In chat mode with the loss on responses only and a system prompt: the template the R1-Distill profile
    # recommends, run through every stage in one kernel.
    params = {**yaml.safe_load((PROFILES / "cpu_tiny.yaml").read_text()), "run_dir": str(tmp_path / "e2e"),
              "max_steps": 12, "eval_steps": 6, "save_steps": 6, "max_new_tokens": 16, "formats": ["lora"],
              "prompt_template": "chat", "train_on_responses_only": True, "system_prompt": "Answer like a warm friend."}
    notebook_config(params)  # the profile is valid for this notebook
    executed = run_notebook("colab_end_to_end", params, tmp_path / "e2e")
    run = tmp_path / "e2e"
    record = read_json(run / "run.json")
    assert record["status"] == "finished" and record["metrics"]["steps"] == 12
    assert record["parameters"]["prompt_template"] == "chat" and record["parameters"]["train_on_responses_only"]
    assert len([r for r in read_train_log(run / "train_log.csv") if r["loss"] is not None]) == 12
    assert record["runtime_peak_memory"]["peak_rss_gib"] >= record["metrics"]["peak_rss_gib"] > 0
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations] == RunConfig().prompts
    evaluation = read_json(run / "eval.json")
    assert evaluation["rows"] > 0 and evaluation["tuned"]["loss"] < evaluation["base"]["loss"]
    manifest = read_json(run / "export/manifest.json")
    assert manifest["formats"]["lora"]["status"] == "ok" and manifest["formats"]["lora"]["reload"]["same_answer"]
    images = [o for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the loss curve and the evaluation chart are shown inline"


def test_a_merged_export_refuses_to_start_without_the_disk_it_needs_but_never_for_memory(monkeypatch, tmp_path):
    import psutil
    import unsloth_zoo.disk_utils as disk_utils

    import helpers.export as export
    import helpers.export_room as export_room

    monkeypatch.setattr(disk_utils, "model_16bit_bytes", lambda model: 16 * 10**9)
    monkeypatch.setattr(export_room.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=15 * 10**9))
    with pytest.raises(RuntimeError, match=r"needs about 16.0 GB in .* \(2.0 bytes a parameter, measured: 14.96 GiB "
                                           r"written .*\), where 15.0 GB are free"):
        export.check_room("merged_16bit", object(), RunConfig(), tmp_path / "merged_16bit")
    # a q4_k_m GGUF also holds the 16-bit GGUF llama-quantize reads, beside the merged checkpoint
    with pytest.raises(RuntimeError, match=r"needs about 36.9 GB"):
        export.check_room("gguf", object(), RunConfig(gguf_quantization="q4_k_m"), tmp_path / "gguf")
    monkeypatch.setattr(export_room.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=17 * 10**9))
    # a free Colab's 12.7 GB of memory is no reason to refuse: the merge is attempted and watched
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=int(12.7 * 10**9)))
    export.check_room("merged_16bit", object(), RunConfig(), tmp_path / "merged_16bit")


def test_merged_16bit_is_checked_in_4bit_when_the_run_trained_in_4bit():
    from helpers.export import reloads_in_4bit

    assert reloads_in_4bit("merged_16bit", RunConfig(load_in_4bit=True))
    assert not reloads_in_4bit("merged_16bit", RunConfig(load_in_4bit=False))
    assert reloads_in_4bit("merged_4bit", RunConfig(load_in_4bit=False))


def test_default_formats_fit_a_t4_and_a_free_drive():
    assert "merged_16bit" not in RunConfig().formats and "lora" in RunConfig().formats
