"""micro_batching: the recipe's rows per optimizer step in fewer, larger micro-batches is the same optimization."""
from __future__ import annotations

import pytest

from helpers.batching import micro_batch_rows
from helpers.config import RunConfig
from helpers.records import read_json, read_train_log

# Largest relative difference between recipe (2 x 4) and auto (8 x 1) over 20 fp32 steps of SmolLM2-135M-Instruct on
# the CPU, measured 2026-11-30 (2 threads): loss 4.1e-7, grad norm 1.7e-6 (float rounding of sums taken in another
# order; the tiny model gave 1.7e-7 and 2.1e-7 under 1 and 2 threads). 1e-4 leaves room for another CPU and thread
# count and stays far below what other rows or another normalization would move: the loss changes by more than 1e-2
# from one step to the next.
RELATIVE_TOLERANCE = 1e-4


@pytest.mark.parametrize("budget, expected", [(None, 8), (10 * 2048, 8), (4 * 2048, 4), (3 * 2048, 2), (0, 2)])
def test_auto_picks_the_largest_divisor_of_the_step_that_fits(budget, expected):
    assert micro_batch_rows(8, 2, 2048, budget) == expected


class _Shape8B:
    """The 8B shape's config, as plan() reads it from a loaded model."""

    class config:  # noqa: N801
        @staticmethod
        def get_text_config():
            return type("TextConfig", (), {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32})


@pytest.mark.parametrize("free_gib, longest, expected", [
    (7.6, 167, (8, 1, True)),  # the sample's rows: one micro-batch, its checkpoints fit on the GPU too
    (7.6, 2048, (8, 1, False)),  # 8 rows of 2,048 tokens fit as one micro-batch, their checkpoints do not
    (3.0, 2048, (2, 4, False)),  # less room: the recipe's micro-batches
])
def test_auto_plans_micro_batches_and_checkpoints_by_the_gpu_memory_left(monkeypatch, free_gib, longest, expected):
    from helpers import batching

    monkeypatch.setattr(batching, "free_gpu_bytes", lambda model, config: free_gib * 2**30)
    computed = batching.plan(RunConfig(), 2, 4, _Shape8B(), longest)
    assert (computed.rows, computed.accumulation, computed.resident_checkpoints) == expected
    assert computed.flash_attention and computed.gradient_checkpointing == (True if expected[2] else "unsloth")


def test_recipe_and_the_cpu_compute_as_the_tutorial_does(monkeypatch):
    from helpers import batching

    monkeypatch.setattr(batching, "free_gpu_bytes", lambda model, config: None)  # no GPU
    assert batching.plan(RunConfig(), 2, 4, _Shape8B(), 2048) == batching.Plan(8, 1)
    assert batching.plan(RunConfig(micro_batching="recipe"), 2, 4, _Shape8B(), 167) == batching.Plan(2, 4)
    assert batching.Plan(2, 4).gradient_checkpointing == "unsloth"


def test_micro_batching_is_validated():
    with pytest.raises(ValueError, match="micro_batching 'fast' is unknown; choose one of: auto, recipe"):
        RunConfig(micro_batching="fast")


def _train(tmp_path, micro_batching):
    """20 steps of SmolLM2-135M-Instruct (a real pretrained model, fp32, in its chat template) with the recipe's
    2 x 4 rows per step; rows cut to 48 tokens and the loss on all of them, so that both runs take about a minute
    on two cores."""
    import helpers.stack  # noqa: F401
    from helpers.data import SAMPLE_DATASET
    from helpers.fine_tuning import run_training
    from helpers.local_models import SMOLLM2_MODEL_DIR, build_smollm2
    from helpers.project import PROJECT_ROOT, load_profile

    model = build_smollm2(PROJECT_ROOT / SMOLLM2_MODEL_DIR)
    run_dir = tmp_path / micro_batching
    config = RunConfig.from_dict({**load_profile("cpu_smollm2"), "model_name": str(model),
                                  "dataset": str(SAMPLE_DATASET), "run_dir": str(run_dir), "max_steps": 20,
                                  "micro_batching": micro_batching, "eval_fraction": 0.0, "save_steps": 100,
                                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                  "max_seq_length": 48, "train_on_responses_only": False})
    run_training(config)
    return read_train_log(run_dir / "train_log.csv"), read_json(run_dir / "run.json")


@pytest.mark.real_model
def test_auto_trains_the_recipe_step_for_step(tmp_path):
    recipe_log, recipe = _train(tmp_path, "recipe")
    auto_log, auto = _train(tmp_path, "auto")
    assert recipe["distributed"]["per_device_train_batch_size"] == 2
    assert recipe["distributed"]["gradient_accumulation_steps"] == 4
    assert auto["distributed"]["per_device_train_batch_size"] == 8
    assert auto["distributed"]["gradient_accumulation_steps"] == 1
    assert auto["parameters"]["micro_batching"] == "auto"
    assert len(recipe_log) == len(auto_log) == 20
    assert recipe["metrics"]["trained_tokens"] == auto["metrics"]["trained_tokens"]
    for a, b in zip(recipe_log, auto_log):
        for column in ("loss", "grad_norm"):
            assert b[column] == pytest.approx(a[column], rel=RELATIVE_TOLERANCE), (a["step"], column)
