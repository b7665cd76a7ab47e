"""The notebooks executed through papermill on the tiny profile, checked by what they recorded."""
from __future__ import annotations

import json

import nbformat
import pytest
import yaml

from helpers.config import DEFAULT_PROMPTS, RunConfig
from helpers.pipeline import run_notebook
from helpers.paths import PROFILES
from helpers.records import read_json, read_train_log
from tests.conftest import TINY_RUN

pytestmark = pytest.mark.notebook
TINY = yaml.safe_load((PROFILES / "cpu_tiny.yaml").read_text())


def test_run_dir_holds_every_output(tiny_run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "train_log.csv", "loss.png", "run.json", "generations.jsonl",
                 "split.json", "eval.json", "eval.md", "eval.png",
                 "00_setup.ipynb", "01_train_lora.ipynb", "02_inference.ipynb", "03_evaluate.ipynb"):
        assert (tiny_run / name).is_file(), f"{name} missing from run_dir"
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((tiny_run / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == TINY["lora_r"] and adapter["lora_alpha"] == TINY["lora_alpha"]
    assert set(adapter["target_modules"]) == set(RunConfig().target_modules)


def test_run_json_records_what_made_the_run(tiny_run):
    record = read_json(tiny_run / "run.json")
    assert record["status"] == "finished"
    assert record["parameters"] == RunConfig.from_dict({**TINY, **TINY_RUN, "run_dir": str(tiny_run)}).to_dict()
    assert record["precision"] == "fp32"
    versions = record["environment"]["versions"]
    for package in ("torch", "transformers", "trl", "peft", "unsloth", "datasets"):
        assert versions[package], f"{package} version not recorded"
    assert "git_commit" in record["environment"] and record["accelerator"]["device"] == "cpu"
    metrics = record["metrics"]
    assert metrics["steps"] == TINY["max_steps"]
    assert metrics["trained_tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["train_runtime_s"] > 0
    assert metrics["peak_rss_gib"] > 0


def test_loss_falls_clearly(tiny_run):
    rows = read_train_log(tiny_run / "train_log.csv")
    assert [r["step"] for r in rows] == list(range(1, TINY["max_steps"] + 1))
    assert all(r["learning_rate"] is not None and r["grad_norm"] is not None for r in rows)
    tenth = len(rows) // 10
    first = sum(r["loss"] for r in rows[:tenth]) / tenth
    last = sum(r["loss"] for r in rows[-tenth:]) / tenth
    assert last < 0.85 * first, f"loss fell only from {first:.3f} to {last:.3f}"


def test_held_out_rows_are_recorded_and_never_trained_on(tiny_run):
    split = read_json(tiny_run / "split.json")
    rows = split["rows"]
    assert len(split["eval_indices"]) == round(rows * TINY["eval_fraction"]) and len(set(split["eval_indices"])) > 0
    metrics = read_json(tiny_run / "run.json")["metrics"]
    assert metrics["train_rows"] == rows - len(split["eval_indices"])
    # The trainer scored its fixed subset of the held-out rows while training; 03_evaluate scored every one.
    assert metrics["training_eval_rows"] == len(split["training_eval_indices"]) < len(split["eval_indices"])
    assert set(split["training_eval_indices"]) < set(split["eval_indices"])
    assert read_json(tiny_run / "eval.json")["rows"] == len(split["eval_indices"])
    evals = [r for r in read_train_log(tiny_run / "train_log.csv") if r["eval_loss"] is not None]
    assert [r["step"] for r in evals] == list(range(20, TINY["max_steps"] + 1, 20))


def test_evaluation_shows_the_tuned_model_beats_the_base(tiny_run):
    report = read_json(tiny_run / "eval.json")
    assert report["rows"] == len(read_json(tiny_run / "split.json")["eval_indices"])
    for model in ("base", "tuned"):
        for field in ("loss", "perplexity", "preference_accuracy", "mean_margin", "n_ties", "n_tokens"):
            assert field in report[model], f"{model}.{field} missing from eval.json"
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert report["tuned"]["preference_accuracy"] > report["base"]["preference_accuracy"]
    assert [g["prompt"] for g in report["generations"]] == DEFAULT_PROMPTS
    assert all({"base", "tuned"} <= set(g) for g in report["generations"])
    assert "| preference_accuracy |" in (tiny_run / "eval.md").read_text()
    assert (tiny_run / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_inference_saved_one_answer_per_prompt(tiny_run):
    lines = (tiny_run / "generations.jsonl").read_text().splitlines()
    generations = [json.loads(line) for line in lines]
    assert [g["prompt"] for g in generations] == DEFAULT_PROMPTS
    assert all(isinstance(g["response"], str) and g["temperature"] == 0.0 for g in generations)


def test_executed_training_notebook_shows_the_loss_plot(tiny_run):
    nb = nbformat.read(tiny_run / "01_train_lora.ipynb", as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{TINY['max_steps']} steps in" in printed and "tokens/s" in printed and "peak RSS" in printed
    assert "where the time went: training steps" in printed
    # one row as the model sees it: the prompt as at inference, then the response and one EOS
    assert "### Instruction:\nWhat's your favorite season?\n\n### Response:\nOh, autumn, hands down!" in printed


TRAINING_STAGES = ["data checked", "data formatted", "model loaded", "LoRA added", "trainer built", "training steps",
                   "in-training evaluation", "checkpoints", "adapter saved"]


def test_every_stage_of_the_run_is_timed_in_run_json(tiny_run):
    record = read_json(tiny_run / "run.json")
    stages = record["stages"]
    # training's stages in order, then inference's and evaluation's
    assert list(stages)[:len(TRAINING_STAGES)] == TRAINING_STAGES
    assert {"tuned model loaded", "answers generated", "held-out rows scored", "side-by-side answers"} <= set(stages)
    assert all(seconds >= 0 for seconds in stages.values()) and stages["training steps"] > 0
    assert stages["in-training evaluation"] > 0  # every eval_steps
    # the trainer's wall time, divided: steps, evaluation and checkpoints add up to it
    trained = sum(stages[name] for name in ("training steps", "in-training evaluation", "checkpoints"))
    assert trained == pytest.approx(record["metrics"]["train_runtime_s"], rel=0.02, abs=0.3)
    nb = nbformat.read(tiny_run / "03_evaluate.ipynb", as_version=4)
    shown = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
    assert "| held-out rows scored |" in shown and "| **total** |" in shown
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "run_dir" in injected[0].source


def _failed_before_model_load(tmp_path, params):
    """Run the training notebook with bad parameters; return the error text and the executed notebook."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as failure:
        run_notebook("01_train_lora", {**TINY, "run_dir": str(tmp_path / "run"), **params}, tmp_path)
    nb = nbformat.read(tmp_path / "01_train_lora.ipynb", as_version=4)
    training = next(c for c in nb.cells if "helpers.train.train(" in c.source)
    assert training.execution_count is None, "the training cell ran although the input was bad"
    return str(failure.value)


def test_unknown_parameter_stops_the_notebook_before_the_model_loads(tmp_path):
    import papermill

    nb = tmp_path / "nb"
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        papermill.execute_notebook("notebooks/01_train_lora.ipynb", str(tmp_path / "out.ipynb"),
                                   parameters={**TINY, "run_dir": str(nb), "learnig_rate": 0.1},
                                   kernel_name="python3", progress_bar=False, log_output=False)
    assert "learnig_rate" in str(failure.value) and "did you mean 'learning_rate'" in str(failure.value)
    assert not (nb / "run.json").exists()


def test_missing_dataset_file_stops_the_notebook_before_the_model_loads(tmp_path):
    message = _failed_before_model_load(tmp_path, {"dataset": "no/such/file.jsonl"})
    assert "no/such/file.jsonl" in message and "does not exist" in message


def test_missing_column_stops_the_notebook_before_the_model_loads(tmp_path):
    message = _failed_before_model_load(tmp_path, {"response_field": "answer"})
    assert "'answer'" in message and "columns found: prompt, chosen, rejected" in message


# --- preference tuning: 06 then 03, continuing tiny_run's adapter ---------------------------------------------

def test_dpo_run_records_a_finished_run_that_continues_the_sft_run(dpo_run, tiny_run):
    record = read_json(dpo_run / "run.json")
    assert record["status"] == "finished" and record["stage"] == "dpo"
    assert record["reference"] == "the base model, adapter disabled"  # read from the trainer, not the config
    sft = read_json(tiny_run / "run.json")["parameters"]
    for name in ("model_name", "lora_r", "lora_alpha", "prompt_template", "dataset"):
        assert record["parameters"][name] == sft[name]
    assert record["parameters"]["sft_run_dir"] == str(tiny_run) and record["metrics"]["steps"] == 4
    # The SFT run's held-out rows stay held out: the same split, copied.
    assert read_json(dpo_run / "split.json")["eval_indices"] == read_json(tiny_run / "split.json")["eval_indices"]
    dpo_subset = read_json(dpo_run / "split.json")["training_eval_indices"]
    assert record["metrics"]["training_eval_rows"] == len(dpo_subset)
    assert set(dpo_subset) <= set(read_json(tiny_run / "split.json")["eval_indices"])
    # Only the trained adapter is saved, in the SFT adapter's shape.
    assert not (dpo_run / "adapter" / "ref").exists()
    assert json.loads((dpo_run / "adapter/adapter_config.json").read_text())["r"] == sft["lora_r"]


def test_dpo_logs_and_plots_reward_accuracy_and_margin(dpo_run):
    rows = read_train_log(dpo_run / "train_log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 <= r["rewards/accuracies"] <= 1 and r["rewards/margins"] is not None for r in rows)
    assert [r["step"] for r in rows if r["eval_rewards/accuracies"] is not None] == [2, 4]
    metrics = read_json(dpo_run / "run.json")["metrics"]
    assert metrics["final_rewards_margins"] == rows[-1]["rewards/margins"]
    assert metrics["final_eval_rewards_margins"] > 0  # the policy already ranks held-out chosen above rejected
    nb = nbformat.read(dpo_run / "06_preference_dpo.ipynb", as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and (dpo_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_of_a_dpo_run_compares_base_sft_and_dpo_on_the_same_rows(dpo_run, tiny_run):
    report = read_json(dpo_run / "eval.json")
    assert list(report["compared"]) == [str(tiny_run)]
    sft, dpo = report["compared"][str(tiny_run)], report["tuned"]
    own = read_json(tiny_run / "eval.json")["tuned"]  # the SFT run's own evaluation: the same rows, the same scores
    assert sft["n_tokens"] == own["n_tokens"] and sft["loss"] == pytest.approx(own["loss"], rel=1e-5)
    assert dpo["mean_margin"] > sft["mean_margin"] > report["base"]["mean_margin"]
    assert f"| metric | base | {tiny_run.name} | {dpo_run.name} |" in (dpo_run / "eval.md").read_text()


def test_identical_answers_stop_the_dpo_notebook_before_the_model_loads(tmp_path):
    import papermill

    data = tmp_path / "same.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same" if i == 2 else "x"})
                              for i in range(4)))
    params = {**yaml.safe_load((PROFILES / "cpu_tiny_dpo.yaml").read_text()), "sft_run_dir": "",
              "dataset": str(data), "run_dir": str(tmp_path / "run")}
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        run_notebook("06_preference_dpo", params, tmp_path)
    assert "1 rows have the same 'chosen' and 'rejected' answer (rows 3)" in str(failure.value)
    nb = nbformat.read(tmp_path / "06_preference_dpo.ipynb", as_version=4)
    assert next(c for c in nb.cells if "metrics = helpers.train.train(" in c.source).execution_count is None
    assert not (tmp_path / "run" / "run.json").exists()


def test_an_interrupted_dpo_run_resumes_from_its_checkpoint_to_the_same_result(dpo_run, tiny_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    # An interrupted copy of dpo_run: its step-2 checkpoint, its record still 'running', no adapter yet.
    run_dir = tmp_path / "interrupted"
    shutil.copytree(dpo_run / "checkpoints" / "checkpoint-2", run_dir / "checkpoints" / "checkpoint-2")
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))
    params = {**yaml.safe_load((PROFILES / "cpu_tiny_dpo.yaml").read_text()), "sft_run_dir": str(tiny_run),
              "run_dir": str(run_dir), "max_steps": 4, "eval_steps": 2, "save_steps": 2}
    run_notebook("06_preference_dpo", params, run_dir)
    record = read_json(run_dir / "run.json")
    assert record["status"] == "finished" and record["metrics"]["resumed_from_step"] == 2
    resumed, straight = read_train_log(run_dir / "train_log.csv"), read_train_log(dpo_run / "train_log.csv")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), f"step {a['step']} differs"
    tuned, reference = load_file(run_dir / "adapter/adapter_model.safetensors"), load_file(
        dpo_run / "adapter/adapter_model.safetensors")
    assert tuned.keys() == reference.keys()
    assert all((tuned[name] - reference[name]).abs().max().item() <= 1e-6 for name in tuned)
