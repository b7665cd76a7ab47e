"""The training entry point: global-batch arithmetic, and a single-process run through `accelerate launch`."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.records import read_json, read_train_log
from helpers.fine_tuning import split_global_batch
from tests.conftest import TINY_RUN


@pytest.mark.parametrize("processes, expected", [(1, (2, 4)), (2, (2, 2)), (4, (2, 1))])
def test_the_global_batch_is_kept_across_processes(processes, expected):
    per_device, accumulation = split_global_batch(2, 4, processes)
    assert (per_device, accumulation) == expected
    assert per_device * accumulation * processes == 8


def test_a_global_batch_that_does_not_split_is_an_error():
    with pytest.raises(ValueError, match=r"global batch 8 .* does not split evenly over 3 processes"):
        split_global_batch(2, 4, 3)


@pytest.mark.notebook
def test_accelerate_launch_runs_the_entry_point_single_process(tiny_run, tmp_path):
    run_dir = tmp_path / "launched"
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                    "-m", "helpers.train", "--profile", "cpu_tiny", "-p", "run_dir", str(run_dir),
                    *[arg for name, value in TINY_RUN.items() for arg in ("-p", name, str(value))]],
                   check=True, capture_output=True)
    record = read_json(run_dir / "run.json")
    assert record["status"] == "finished"
    peaks = record["distributed"].pop("peak_memory_per_process")
    # the recipe's 2 x 4 rows per step, computed as one micro-batch of 8 (micro_batching="auto")
    # (on the CPU nothing is offloaded and no cuDNN runs: the checkpointing and attention stay the recipe's)
    assert record["distributed"] == {"num_processes": 1, "micro_batching": "auto", "per_device_train_batch_size": 8,
                                     "gradient_accumulation_steps": 1, "use_gradient_checkpointing": "unsloth",
                                     "attention": "default", "layers_kept_un_checkpointed": "none",
                                     "global_batch": 8}
    assert len(peaks) == 1 and peaks[0]["peak_rss_gib"] > 0
    assert record["metrics"]["steady_tokens_per_s"] > 0 and record["metrics"]["steady_s_per_step"] > 0
    assert (run_dir / "adapter/adapter_model.safetensors").is_file() and (run_dir / "loss.png").is_file()
    # the same seed and parameters as tiny_run, through another entry point: the same training log (losses to a
    # relative 1e-4: the same arithmetic, whatever thread count the worker's torch has)
    launched, notebook = read_train_log(run_dir / "train_log.csv"), read_train_log(tiny_run / "train_log.csv")
    assert len(launched) == len(notebook) == 120
    assert [sorted(k for k, v in row.items() if v is not None) for row in launched] == \
        [sorted(k for k, v in row.items() if v is not None) for row in notebook]
    for mine, theirs in zip(launched, notebook):
        assert {k: v for k, v in mine.items() if v is not None} == \
            pytest.approx({k: v for k, v in theirs.items() if v is not None}, rel=1e-4), mine["step"]


def test_a_notebook_asking_for_two_gpus_launches_the_entry_point_in_fresh_processes(monkeypatch, tmp_path):
    import io
    import json

    import helpers.train as entry
    from helpers.config import RunConfig
    from helpers.records import write_json

    config = RunConfig(run_dir=str(tmp_path / "run"), num_processes=2)
    launched = {}

    class FakeLaunch:
        def __init__(self, command, **kwargs):
            launched["command"] = command
            launched["parameters"] = json.loads(open(command[command.index("--parameters") + 1]).read())
            write_json(tmp_path / "run" / "run.json", {"metrics": {"steps": 3}})
            self.stdout, self.returncode = io.StringIO("step 1\n"), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(entry.subprocess, "Popen", FakeLaunch)
    assert entry.train(config) == {"steps": 3}
    command = launched["command"]
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert command[5:7] == ["-m", "helpers.train"] and launched["parameters"] == config.to_dict()
