"""micro_batching: the recipe's rows per optimizer step in fewer, larger micro-batches is the same optimization."""
from __future__ import annotations

import pytest

from helpers.batching import micro_batch_rows
from helpers.config import RunConfig
from helpers.records import read_json, read_train_log

# Largest relative difference between recipe (2 x 4) and auto (8 x 1) over 20 fp32 steps on the CPU, measured
# 2026-11-30 under OMP_NUM_THREADS=1 and 2 alike: loss 1.7e-7, grad norm 2.1e-7 (float rounding of sums taken in
# another order). 1e-5 leaves room for another CPU and thread count and stays far below what other rows or another
# normalization would move: the loss changes by more than 1e-2 from one step to the next.
RELATIVE_TOLERANCE = 1e-5


@pytest.mark.parametrize("budget, expected", [(None, 8), (10 * 2048, 8), (4 * 2048, 4), (3 * 2048, 2), (0, 2)])
def test_auto_picks_the_largest_divisor_of_the_step_that_fits(budget, expected):
    assert micro_batch_rows(8, 2, 2048, budget) == expected


def test_micro_batching_is_validated():
    with pytest.raises(ValueError, match="micro_batching 'fast' is unknown; choose one of: auto, recipe"):
        RunConfig(micro_batching="fast")


def _train(tmp_path, micro_batching):
    from helpers.data import SAMPLE_DATASET
    from helpers.local_models import build_tiny_model
    from helpers.project import load_profile
    from helpers.fine_tuning import run_training

    model = build_tiny_model(tmp_path / "model")
    run_dir = tmp_path / micro_batching
    config = RunConfig.from_dict({**load_profile("cpu_tiny"), "model_name": str(model), "dataset": str(SAMPLE_DATASET),
                                  "run_dir": str(run_dir), "max_steps": 20, "micro_batching": micro_batching,
                                  "eval_fraction": 0.0, "save_steps": 100})
    run_training(config)
    return read_train_log(run_dir / "train_log.csv"), read_json(run_dir / "run.json")


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
