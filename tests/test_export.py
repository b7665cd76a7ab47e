"""Exports of the tiny run: each format written through a temporary folder, reloaded and checked against the tuned
model's greedy answer, described in a manifest and a model card; the push planned (dry run), pushed through a
stand-in Hub API, refused without a token; and the token written nowhere."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nbformat
import papermill
import pytest
import torch

from helpers.config import RunConfig
from helpers.paths import PROJECT_ROOT
from helpers.export import check_all_exported, export_all
from helpers.modeling import load_trained_model
from helpers.hub import TOKEN_HELP, check_push_ready, push_exports
from helpers.model_card import model_card
from helpers.pipeline import run_notebook
from helpers.records import read_json, staged_folder
from tests.conftest import HF_TOKEN_SENTINEL, assert_token_in_no_file

REPO = "tester/tiny-export"
DEFAULT_REPOS = {"lora": f"{REPO}-lora", "merged_16bit": REPO}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A copy of tiny_run (tiny_run itself is only read) after the export notebook ran on it: the adapter and merged
    16-bit, push_to_hub with dry_run."""
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("exported") / "tiny-run",
                          ignore=shutil.ignore_patterns("checkpoint-*"))
    run_notebook("04_export", {"run_dir": str(run), "formats": ["lora", "merged_16bit"], "push_to_hub": True,
                               "hub_repo_id": REPO, "dry_run": True}, run / "export")
    return run


def _copy_run(tiny_run: Path, to: Path, with_exports: bool = False) -> Path:
    """A copy of the run's record, adapter and plot (and exports) to work on without touching tiny_run."""
    to.mkdir(parents=True)
    for name in ("run.json", "loss.png"):
        shutil.copyfile(tiny_run / name, to / name)
    shutil.copytree(tiny_run / "adapter", to / "adapter")
    if with_exports:
        shutil.copytree(tiny_run / "export", to / "export")
    return to


@pytest.mark.notebook
def test_lora_and_merged_16bit_reload_with_the_tuned_models_answer(exported):
    manifest = read_json(exported / "export/manifest.json")
    assert set(manifest["formats"]) == {"lora", "merged_16bit"}
    expected = manifest["check"]["expected_answer"]
    assert expected.strip(), "the tuned model gave an empty answer; the check would prove nothing"
    # the adapter goes back onto the base weights in memory; the merge loads as a model of its own (fp32 here)
    loaded_in = {"lora": "onto the base weights in memory", "merged_16bit": "fp32"}
    for name, entry in manifest["formats"].items():
        assert entry["status"] == "ok", entry
        assert entry["reload"] == {"loaded": True, "loaded_in": loaded_in[name], "same_answer": True,
                                   "token_agreement": 1.0, "answer": expected, "expected": expected}
    assert manifest["formats"]["merged_16bit"]["save_method"] == "merged_16bit"


@pytest.mark.notebook
def test_manifest_lists_every_file_with_its_size_and_checksum(exported):
    manifest = read_json(exported / "export/manifest.json")
    for name, entry in manifest["formats"].items():
        folder = exported / entry["path"]
        assert folder == exported / "export" / name
        on_disk = sorted(p.name for p in folder.iterdir())
        assert [f["name"] for f in entry["files"]] == on_disk
        for f in entry["files"]:
            data = (folder / f["name"]).read_bytes()
            assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["total_bytes"] == sum(f["bytes"] for f in entry["files"])
    lora = exported / "export/lora"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "loss.png"):
        assert (lora / name).is_file()
    merged = exported / "export/merged_16bit"
    assert read_json(merged / "config.json")["dtype"] in ("bfloat16", "float16")
    from safetensors import safe_open

    with safe_open(str(merged / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("lora" in k for k in keys)
        assert weights.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype in (torch.bfloat16, torch.float16)


@pytest.mark.notebook
def test_no_temporary_folder_is_left(exported):
    assert sorted(p.name for p in (exported / "export").iterdir()) == [
        "04_export.ipynb", "lora", "manifest.json", "merged_16bit", "push_plan.json"]


@pytest.mark.notebook
def test_each_export_has_a_model_card_from_the_run(exported):
    params = read_json(exported / "run.json")["parameters"]
    for name, repo in DEFAULT_REPOS.items():
        card = (exported / "export" / name / "README.md").read_text()
        assert card.startswith("---\n") and "library_name: " in card and "- unsloth" in card
        for text in (params["model_name"], params["dataset"], f"r={params['lora_r']}, alpha={params['lora_alpha']}",
                     f"{params['max_steps']} steps", "## Training", "![Training loss](loss.png)", "## Usage",
                     f'from_pretrained("{repo}"', "### Instruction:"):
            assert text in card, f"{name} card lacks {text!r}"
        if (exported / "eval.json").exists():  # written by the evaluate notebook when the pipeline runs it
            tuned = read_json(exported / "eval.json")["tuned"]
            assert "## Evaluation" in card and f"| {round(tuned['perplexity'], 2)} |" in card
        else:
            assert "## Evaluation" not in card
        assert "license: apache-2.0" in card and "## License" in card  # the tiny base's card, built here, names it
    assert "FastLanguageModel" in (exported / "export/lora/README.md").read_text()
    assert "AutoModelForCausalLM" in (exported / "export/merged_16bit/README.md").read_text()


@pytest.mark.parametrize("front, expected", [("license: llama3.1", "llama3.1"),
                                             ("license: other\nlicense_name: deepseek", "deepseek"),
                                             ("tags:\n- x", "unknown"), (None, "unknown")])
def test_the_base_models_license_is_read_from_its_card(tmp_path, front, expected):
    from helpers.model_card import base_model_license

    if front is not None:
        (tmp_path / "README.md").write_text(f"---\n{front}\n---\n# A model\n")
    assert base_model_license(str(tmp_path)) == expected


def test_a_hub_models_license_is_unknown_offline_without_its_card_in_the_cache(monkeypatch):
    from helpers.model_card import base_model_license, model_card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert base_model_license("someone/never-downloaded") == "unknown"
    record = {"parameters": RunConfig().to_dict(), "metrics": {}}
    card = model_card(record, None, "lora", "x/y", has_plot=False, base_license="llama3.1")
    assert "license: llama3.1" in card and "`llama3.1`" in card.split("## License")[1]
    card = model_card(record, None, "lora", "x/y", has_plot=False, base_license="deepseek")
    assert "license: other\nlicense_name: deepseek" in card


@pytest.mark.notebook
def test_dry_run_push_lists_the_right_files(exported):
    plan = read_json(exported / "export/push_plan.json")
    assert plan["dry_run"] is True and plan["token_found"] is True and plan["skipped"] == {} and "pushed" not in plan
    assert {u["format"]: u["repo_id"] for u in plan["uploads"]} == DEFAULT_REPOS
    for upload in plan["uploads"]:
        folder = exported / "export" / upload["format"]
        assert upload["private"] is True and Path(upload["folder"]) == folder
        assert upload["files"] == sorted(p.name for p in folder.iterdir())
    executed = (exported / "export/04_export.ipynb").read_text()
    assert "Dry run: nothing was uploaded" in executed and REPO in executed


@pytest.mark.notebook
def test_the_token_is_in_no_file_the_export_wrote(exported):
    searched = assert_token_in_no_file(exported, PROJECT_ROOT / "outputs")
    assert (exported / "export/04_export.ipynb").is_file() and searched > 20


class FakeHub:
    """Records what a push asks of huggingface_hub.HfApi; repositories exist with the given privacy."""

    def __init__(self, existing: dict[str, bool] | None = None):
        self.existing, self.calls = existing or {}, []

    def repo_info(self, repo_id, repo_type=None):
        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append(("repo_info", repo_id))
        if repo_id not in self.existing:
            raise RepositoryNotFoundError(f"{repo_id} not found", response=SimpleNamespace(status_code=404,
                                                                                          headers={}, request=None))
        return SimpleNamespace(private=self.existing[repo_id])

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations]))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")


def _push_config(run_dir: Path, **overrides) -> RunConfig:
    return RunConfig(run_dir=str(run_dir), push_to_hub=True, hub_repo_id=REPO, **overrides)


@pytest.mark.notebook
def test_the_real_push_uploads_exactly_the_dry_runs_plan(exported, tmp_path):
    run = _copy_run(exported, tmp_path / "run", with_exports=True)
    manifest = read_json(run / "export/manifest.json")
    dry = push_exports(_push_config(run, dry_run=True), manifest)
    hub = FakeHub()
    pushed = push_exports(_push_config(run), manifest, api=hub)
    assert pushed["pushed"] is True and read_json(run / "export/push_plan.json")["pushed"] is True
    created = [c for c in hub.calls if c[0] == "create_repo"]
    assert [(c[1], c[2]["private"]) for c in created] == [(u["repo_id"], True) for u in dry["uploads"]]
    commits = {c[1]: c[2] for c in hub.calls if c[0] == "create_commit"}
    for upload in dry["uploads"]:
        assert [name for name, _ in commits[upload["repo_id"]]] == upload["files"]
        assert all(Path(path) == run / "export" / upload["format"] / name for name, path in commits[upload["repo_id"]])
    assert HF_TOKEN_SENTINEL not in (run / "export/push_plan.json").read_text()


@pytest.mark.notebook
def test_a_repo_with_the_other_privacy_is_refused_before_any_upload(exported, tmp_path):
    run = _copy_run(exported, tmp_path / "run", with_exports=True)
    hub = FakeHub(existing={DEFAULT_REPOS["lora"]: False})  # the adapter's repo is public; private=True is the default
    with pytest.raises(PermissionError, match="already exists and is public"):
        push_exports(_push_config(run), read_json(run / "export/manifest.json"), api=hub)
    assert not [c for c in hub.calls if c[0] in ("create_repo", "create_commit")]


def _without_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token-file"))  # read by a fresh kernel
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))


def test_push_without_a_token_says_where_to_put_it(monkeypatch, tmp_path):
    _without_token(monkeypatch, tmp_path)
    with pytest.raises(PermissionError) as failure:
        check_push_ready(_push_config(tmp_path))
    assert str(failure.value) == TOKEN_HELP and "HF_TOKEN" in TOKEN_HELP and "Secrets" in TOKEN_HELP
    check_push_ready(_push_config(tmp_path, dry_run=True))  # a dry run needs no token


@pytest.mark.notebook
def test_push_without_a_token_stops_the_notebook_before_anything_is_written(tiny_run, monkeypatch, tmp_path):
    _without_token(monkeypatch, tmp_path)
    run = _copy_run(tiny_run, tmp_path / "run")
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        run_notebook("04_export", {"run_dir": str(run), "push_to_hub": True, "hub_repo_id": REPO}, tmp_path / "nb")
    assert "PermissionError" in str(failure.value) and "HF_TOKEN" in str(failure.value)
    nb = nbformat.read(tmp_path / "nb/04_export.ipynb", as_version=4)
    loading = next(c for c in nb.cells if "load_trained_model" in c.source)
    assert loading.execution_count is None, "the model loaded although the push could not happen"
    assert not (run / "export").exists()


@pytest.mark.notebook
def test_formats_that_cannot_be_made_here_are_recorded_and_the_others_complete(tiny_run, monkeypatch, tmp_path):
    monkeypatch.chdir(PROJECT_ROOT)
    # as on a machine without llama.cpp's tools, without network and with a wrong local source: GGUF cannot be had
    monkeypatch.setenv("LORA_KIT_LLAMA_CPP", str(tmp_path / "no-tools"))
    monkeypatch.setenv("LORA_KIT_LLAMA_CPP_SOURCE", str(tmp_path / "missing.tar.gz"))
    run = _copy_run(tiny_run, tmp_path / "run")
    params = read_json(run / "run.json")["parameters"]
    config = RunConfig.from_dict({**params, "run_dir": str(run), "formats": ["gguf", "merged_4bit", "lora"],
                                  "gguf_quantization": "q4_k_m"})
    model, tokenizer = load_trained_model(config, "fp32", run / "adapter")
    manifest = export_all(model, tokenizer, config, "fp32")
    entries = manifest["formats"]
    assert entries["lora"]["status"] == "ok" and entries["lora"]["reload"]["same_answer"] is True
    assert entries["gguf"]["status"] == "failed" and entries["gguf"]["quantization"] == "q4_k_m"
    assert "LORA_KIT_LLAMA_CPP_SOURCE" in entries["gguf"]["reason"], entries["gguf"]
    if not torch.cuda.is_available():  # unsloth's CPU backend does not merge into 4-bit weights
        assert entries["merged_4bit"]["status"] == "refused"
        assert "merged_4bit_forced" in entries["merged_4bit"]["reason"] and "CPU" in entries["merged_4bit"]["reason"]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["lora", "manifest.json"]
    assert not (tmp_path / "no-tools").exists()  # nothing half-built left where the tools would be
    assert read_json(run / "export/manifest.json") == manifest
    with pytest.raises(RuntimeError, match="not exported: .*gguf .*LORA_KIT_LLAMA_CPP_SOURCE"):
        check_all_exported(config, manifest)


def test_an_interrupted_export_never_leaves_a_folder_that_looks_complete(tmp_path):
    final = tmp_path / "export/lora"
    final.mkdir(parents=True)
    (final / "adapter_model.safetensors").write_text("the earlier, complete export")
    with pytest.raises(KeyboardInterrupt), staged_folder(final) as folder:
        (folder / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.parent.iterdir()) == ["lora"]
    assert (final / "adapter_model.safetensors").read_text() == "the earlier, complete export"
    (final.parent / ".lora.tmp").mkdir()  # what a killed process leaves behind
    (final.parent / ".lora.tmp/adapter_model.safetensors").write_text("torn")
    with staged_folder(final) as folder:
        assert list(folder.iterdir()) == []
        (folder / "adapter_model.safetensors").write_text("new")
    assert sorted(p.name for p in final.parent.iterdir()) == ["lora"]
    assert (final / "adapter_model.safetensors").read_text() == "new"


def test_the_model_card_shows_the_evaluation_when_there_is_one():
    record = {"parameters": RunConfig().to_dict(), "precision": "fp16",
              "metrics": {"steps": 120, "train_runtime_s": 600.0, "trained_tokens": 9000, "tokens_per_s": 15.0,
                          "first_tenth_mean_loss": 2.1, "last_tenth_mean_loss": 1.4, "peak_gpu_reserved_gib": 7.4},
              "accelerator": {"name": "Tesla T4"}}
    evaluation = {"rows": 50,
                  "base": {"loss": 2.5, "perplexity": 12.18, "preference_accuracy": 0.4, "mean_margin": -0.1},
                  "tuned": {"loss": 1.9, "perplexity": 6.69, "preference_accuracy": 0.72, "mean_margin": 0.35}}
    card = model_card(record, evaluation, "gguf", "me/model-GGUF", gguf_files=["model.Q4_K_M.gguf"])
    assert "base_model: unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit" in card
    assert "datasets:\n- HumanLLMs/Human-Like-DPO-Dataset" in card and "Tesla T4" in card and "7.4 GiB GPU" in card
    assert "## Evaluation" in card and "On 50 held-out rows" in card
    assert "| perplexity | 12.18 | 6.69 |" in card and "| preference accuracy | 0.4 | 0.72 |" in card
    assert "llama-cli -m model.Q4_K_M.gguf" in card and "huggingface-cli download me/model-GGUF" in card
    assert "ollama create my-model -f Modelfile" in card
    assert "## Evaluation" not in model_card(record, None, "lora", "me/model-lora")


def test_the_model_card_of_a_dpo_run_says_how_it_was_tuned():
    params = {**RunConfig().to_dict(), "sft_run_dir": "outputs/lora-run", "beta": 0.2}
    record = {"parameters": params, "stage": "dpo", "reference": "the base model, adapter disabled", "metrics": {}}
    card = model_card(record, None, "lora", "me/model-lora")
    assert "- dpo\n" in card and "- sft\n" not in card
    assert "trl's `DPOTrainer`, continuing an SFT adapter" in card and "SFTTrainer" not in card
    assert "| preference tuning | DPO, loss sigmoid, beta 0.2, reference: the base model, adapter disabled |" in card
    sft = model_card({**record, "stage": None, "parameters": RunConfig().to_dict()}, None, "lora", "me/model-lora")
    assert "- sft\n" in sft and "SFTTrainer" in sft and "preference tuning" not in sft


def test_token_agreement_is_one_for_the_same_model_and_counts_each_flipped_step(tmp_path, tiny_tokenizer):
    import helpers.stack  # noqa: F401
    from transformers import AutoModelForCausalLM

    from helpers.export import greedy_answer, token_agreement
    from helpers.local_models import build_random_llama

    model = AutoModelForCausalLM.from_pretrained(build_random_llama(tmp_path / "tiny", "tiny")).eval()
    expected = greedy_answer(model, tiny_tokenizer, RunConfig())
    prompt, answer = expected["prompt_ids"], expected["answer_ids"]
    assert len(answer) > 4 and token_agreement(model, prompt, answer) == 1.0
    # Teacher-forced: a wrong token at one step costs that step only, not the rest of the answer.
    wrong = answer[:2] + [(answer[2] + 1) % model.config.vocab_size] + answer[3:]
    assert token_agreement(model, prompt, wrong) <= 1 - 1 / len(answer) + 1e-9
    with pytest.raises(ValueError, match="no tokens"):
        token_agreement(model, prompt, [])


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("export_format", ["lora", "merged_16bit"])
def test_the_model_card_usage_snippet_is_valid_python(template, export_format):
    card = model_card({"parameters": RunConfig(prompt_template=template).to_dict(), "metrics": {}}, None,
                      export_format, "me/model")
    code = card.split("```python\n")[1].split("```")[0]
    compile(code, "usage", "exec")
    assert code.count("prompt = ") == 1  # the prompt is built once, as in training


def test_a_failed_reload_marks_the_format_failed_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    import helpers.export as export

    run = tmp_path / "run"
    (run / "export/lora").mkdir(parents=True)
    (run / "export/lora/adapter_model.safetensors").write_bytes(b"the earlier export")
    earlier = {"format": "lora", "status": "ok", "path": "export/lora"}
    (run / "export/manifest.json").write_text(json.dumps({"formats": {"lora": earlier}}))
    monkeypatch.setattr(export, "greedy_answer", lambda *args: {"text": "hi", "prompt_ids": [1], "answer_ids": [2]})
    monkeypatch.setattr(export, "_save", lambda name, model, tokenizer, config, folder: (
        folder / "adapter_model.safetensors").write_bytes(b"new, unloadable"))
    monkeypatch.setattr(export, "write_model_card", lambda folder, config, name: None)
    monkeypatch.setattr(export, "reload_check", lambda *args: {"loaded": False, "same_answer": False,
                                                                "error": "OSError: no weights found"})
    config = RunConfig(run_dir=str(run), formats=["lora"], push_to_hub=True, hub_repo_id=REPO, dry_run=True)
    manifest = export_all(None, None, config, "fp32")
    entry = manifest["formats"]["lora"]
    assert entry["status"] == "failed" and "reload check failed: OSError: no weights found" in entry["reason"]
    assert entry["previous"] == earlier
    assert (run / "export/lora/adapter_model.safetensors").read_bytes() == b"the earlier export"
    assert sorted(p.name for p in (run / "export").iterdir()) == ["lora", "manifest.json"]
    with pytest.raises(RuntimeError, match=r"not exported: lora \(the reload check failed"):
        check_all_exported(config, manifest)
    with pytest.raises(RuntimeError, match=r"push refused.*lora \(the reload check failed: OSError"):
        push_exports(config, manifest)  # a dry run's plan too
    assert not (run / "export/push_plan.json").exists()


def test_a_kill_between_the_final_renames_gives_the_old_folder_back(tmp_path):
    final = tmp_path / "export/lora"
    (final.parent / ".lora.old").mkdir(parents=True)  # the old folder moved aside, the new one not yet in place
    (final.parent / ".lora.old/adapter_model.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_folder(final):
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.parent.iterdir()) == ["lora"]
    assert (final / "adapter_model.safetensors").read_text() == "old"


def _cache_a_snapshot(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A Hugging Face cache entry for repo_id, as a download leaves it (refs/main naming the snapshot)."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_offline_the_16bit_merge_takes_the_bases_original_from_the_cache(monkeypatch, tmp_path):
    """Offline, unsloth asked the Hub whether unsloth/DeepSeek-R1-Distill-Llama-8B exists and failed merged_16bit,
    with the original in the cache (the GPU session of 2026-12-07). Now unsloth resolves it to the cached folder."""
    import types

    import huggingface_hub.constants
    from unsloth.models.loader_utils import get_model_name
    from unsloth_zoo.saving_utils import determine_base_model_source

    from helpers.export import cached_sixteen_bit_base

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    record = "unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit"
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=record))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with cached_sixteen_bit_base(model) as folder:  # the original is not in the cache: nothing changes
        assert folder is None and model.config._name_or_path == record
    original = _cache_a_snapshot(tmp_path, "unsloth/DeepSeek-R1-Distill-Llama-8B",
                                 {"config.json": '{"model_type": "llama"}', "model.safetensors": ""})
    with cached_sixteen_bit_base(model) as folder:
        assert folder == str(original)
        # what unsloth's merge then computes from the model (unsloth_zoo.saving_utils.merge_and_overwrite_lora)
        name = get_model_name(model.config._name_or_path, load_in_4bit=False)
        assert determine_base_model_source(name, None, "merged_16bit")[:3] == (str(original), True,
                                                                               "local_unquantized")
    assert model.config._name_or_path == record

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, unsloth asks the Hub itself, as on Colab
    with cached_sixteen_bit_base(model) as folder:
        assert folder is None and model.config._name_or_path == record
