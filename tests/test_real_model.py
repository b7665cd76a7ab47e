"""SmolLM2-135M-Instruct, a real pretrained chat model, end to end: its preparation from the wheel's GGUF, its EOS,
then setup -> SFT -> DPO -> evaluate through papermill, checked by what the runs recorded."""
from __future__ import annotations

import json

import pytest

from helpers.paths import PROJECT_ROOT
from helpers.local_models import SMOLLM2_MODEL_DIR, build_smollm2
from helpers.records import read_json

pytestmark = [pytest.mark.notebook, pytest.mark.real_model]
# A short run (the profile's recipe, fewer rows and steps) so the tier stays within a few minutes on two cores;
# the SFT run it continues is conftest's smollm2_sft_run, shared with the GGUF tests.
DPO = {"max_steps": 10, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "warmup_steps": 1,
       "eval_steps": 10, "save_steps": 10}
PROMPT = "Do you think it's weird to eat cereal for dinner?"  # one short answer: the tier is about the scores


@pytest.fixture(scope="module")
def smollm2_dir():
    """The prepared SmolLM2 checkpoint (built once into outputs/_models, as 00_setup does)."""
    import helpers.stack  # noqa: F401

    return build_smollm2(PROJECT_ROOT / SMOLLM2_MODEL_DIR)


def test_prepared_model_stops_on_the_eos_it_is_trained_to_end_with(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from helpers.config import RunConfig
    from helpers.data import to_training_set
    from helpers.prompts import format_generation_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    generation = GenerationConfig.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and generation.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert json.loads((smollm2_dir / "config.json").read_text()).get("quantization_config") is None
    # Its own ChatML template, no think block; the training row is that prompt, the answer and one <|im_end|>.
    prompt = format_generation_prompt("chat", "Hi!", tokenizer)
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in prompt
    config = RunConfig(model_name=str(smollm2_dir), dataset="x.jsonl", prompt_template="chat",
                       train_on_responses_only=True, max_seq_length=256, run_dir=str(tmp_path / "run"))
    row = to_training_set([{"prompt": "Hi!", "chosen": "Hello there!"}], config, tokenizer)[0]
    ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
    assert row["prompt"] == prompt and ids[-1] == generation.eos_token_id and ids.count(generation.eos_token_id) == 3


def test_a_second_build_with_the_same_recipe_is_skipped(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert build_smollm2(smollm2_dir) == smollm2_dir and weights.stat().st_mtime_ns == written


@pytest.fixture(scope="module")
def real_runs(smollm2_sft_run, tmp_path_factory):
    """(SFT run_dir, DPO run_dir): the shared SFT run on cpu_smollm2, then DPO continuing it and its evaluation,
    which scores base, SFT and SFT+DPO on the same held-out rows."""
    from helpers.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("real")
    sft = smollm2_sft_run
    dpo = run_pipeline("cpu_smollm2_dpo", {**DPO, "sft_run_dir": str(sft), "run_dir": str(root / "dpo"),
                                           "prompts": [PROMPT], "max_new_tokens": 16},
                       ("06_preference_dpo", "03_evaluate"))
    return sft, dpo


def test_sft_lowers_the_held_out_loss_of_the_real_model(real_runs):
    sft, dpo = real_runs
    assert read_json(sft / "run.json")["status"] == "finished"
    report = read_json(dpo / "eval.json")
    base, tuned = report["base"], report["compared"][str(sft)]
    assert tuned["loss"] < 0.95 * base["loss"], f"held-out loss {base['loss']:.3f} -> {tuned['loss']:.3f}"
    assert tuned["preference_accuracy"] > base["preference_accuracy"]


def test_dpo_raises_preference_accuracy_above_sft(real_runs):
    sft, dpo = real_runs
    report = read_json(dpo / "eval.json")
    assert read_json(dpo / "run.json")["parameters"]["model_name"] == SMOLLM2_MODEL_DIR
    sft_accuracy, dpo_accuracy = report["compared"][str(sft)]["preference_accuracy"], report["tuned"]["preference_accuracy"]
    assert dpo_accuracy > sft_accuracy, f"preference accuracy SFT {sft_accuracy:.3f}, SFT+DPO {dpo_accuracy:.3f}"



def test_answers_generated_in_one_batch_are_the_answers_one_at_a_time(real_runs):
    # Prompts of different lengths, padded on the left in the batch; greedy on a real model, no near ties.
    from helpers.config import RunConfig
    from helpers.inference import generate, generate_batch
    from helpers.modeling import load_trained_model

    sft, _ = real_runs
    config = RunConfig.from_dict(read_json(sft / "run.json")["parameters"])
    model, tokenizer = load_trained_model(config, "fp32", sft / "adapter")
    prompts = [PROMPT, "Hi!", "What's the best way to learn to cook when you have never tried before?"]
    args, side = (config.prompt_template, 24, 0.0), tokenizer.padding_side
    assert generate_batch(model, tokenizer, prompts, *args) == [generate(model, tokenizer, p, *args) for p in prompts]
    assert tokenizer.padding_side == side  # the batch's left padding did not stick
