"""Runs that survive: refusing to overwrite, resuming exactly after SIGKILL, stopping on a bad loss, guards."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.config import RunConfig
from helpers.fine_tuning import out_of_memory_advice
from helpers.modeling import check_model_source
from helpers.monitoring import NonFiniteLossError, StopOnNonFiniteLoss
from helpers.records import (
    RunExistsError,
    check_run_dir,
    discard_replaced_run,
    latest_checkpoint,
    read_train_log,
    restore_replaced_run,
)


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
        (path / name).write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_latest_checkpoint_skips_an_incomplete_newer_one_and_removes_it_only_when_asked(tmp_path):
    _checkpoint(tmp_path, 20)
    good = _checkpoint(tmp_path, 40)
    torn = _checkpoint(tmp_path, 60, complete=False)
    assert latest_checkpoint(tmp_path) == good
    assert torn.exists(), "a checkpoint being written must not be removed by a look"
    assert latest_checkpoint(tmp_path, remove_incomplete=True) == good
    assert not torn.exists()
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_torn_trainer_state_makes_a_checkpoint_incomplete(tmp_path):
    good = _checkpoint(tmp_path, 20)
    torn = _checkpoint(tmp_path, 40)
    (torn / "trainer_state.json").write_text('{"global_st')
    assert latest_checkpoint(tmp_path) == good


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(RunExistsError, match="holds a finished run.*overwrite=True"):
        check_run_dir(RunConfig(run_dir=str(run_dir)))
    check_run_dir(RunConfig(run_dir=str(run_dir), overwrite=True))
    assert not (run_dir / "adapter").exists() and not (run_dir / "run.json").exists()


def _finished_run(run_dir: Path) -> dict[str, bytes]:
    """A finished run's files; returns {relative name: bytes} to compare with later."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter/adapter_model.safetensors").write_bytes(b"old weights")
    (run_dir / "train_log.csv").write_text("step,loss\n1,2.5\n")
    (run_dir / "eval.json").write_text('{"loss": 2.4}')
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "parameters": {"max_steps": 1}}))
    return _files(run_dir)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_an_overwrite_keeps_the_finished_run_until_the_new_one_finishes(tmp_path):
    run_dir = tmp_path / "run"
    old = _finished_run(run_dir)
    check_run_dir(RunConfig(run_dir=str(run_dir), overwrite=True))
    assert not (run_dir / "adapter").exists() and not (run_dir / "run.json").exists()
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))  # the new run, then killed
    _checkpoint(run_dir / "checkpoints", 20)
    with pytest.raises(RunExistsError):  # the next run finds the old finished run back in place, whole
        check_run_dir(RunConfig(run_dir=str(run_dir)))
    assert _files(run_dir) == old
    check_run_dir(RunConfig(run_dir=str(run_dir), overwrite=True))  # again, and this time the new run finishes
    (run_dir / "run.json").write_text(json.dumps({"status": "finished"}))
    discard_replaced_run(run_dir)
    assert _files(run_dir) == {"run.json": b'{"status": "finished"}'}


@pytest.mark.parametrize("aside", [".replacing", ".restoring"])
def test_a_kill_while_moving_the_old_run_aside_or_back_loses_nothing(tmp_path, aside):
    run_dir = tmp_path / "run"
    old = _finished_run(run_dir)
    (run_dir / aside).mkdir()  # killed with two of its files moved, the others not yet
    for name in ("adapter", "run.json"):
        (run_dir / name).rename(run_dir / aside / name)
    restore_replaced_run(run_dir)
    assert _files(run_dir) == old


def test_a_failed_overwrite_gives_the_finished_run_back(tmp_path):
    import torch

    from helpers.fine_tuning import train_and_record

    class FailingTrainer:
        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory")

        def is_world_process_zero(self):
            return True

    run_dir = tmp_path / "run"
    old = _finished_run(run_dir)
    config = RunConfig(run_dir=str(run_dir), overwrite=True)
    check_run_dir(config)
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(RuntimeError, match="CUDA ran out of memory"):
        train_and_record(FailingTrainer(), None, None, config)
    assert _files(run_dir) == old


def test_an_interrupted_run_keeps_its_checkpoints_unless_resume_is_never(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoints", 20)
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))
    check_run_dir(RunConfig(run_dir=str(run_dir)))
    assert latest_checkpoint(run_dir / "checkpoints") is not None
    check_run_dir(RunConfig(run_dir=str(run_dir), resume="never"))
    assert not (run_dir / "checkpoints").exists()


def test_non_finite_loss_stops_with_advice(tmp_path):
    config = RunConfig(run_dir=str(tmp_path), learning_rate=1e-3)
    callback = StopOnNonFiniteLoss(config)
    state = type("State", (), {"global_step": 7})()
    callback.on_log(None, state, None, logs={"loss": 1.5})
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 7.*no checkpoint.*learning_rate \(now 0.001\)"):
        callback.on_log(None, state, None, logs={"loss": math.nan})


def test_out_of_memory_advice_names_the_settings_and_their_values():
    advice = out_of_memory_advice(RunConfig(per_device_train_batch_size=4, max_seq_length=4096))
    assert "per_device_train_batch_size (now 4)" in advice and "max_seq_length (now 4096)" in advice


def test_a_missing_local_model_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local path that does not exist"):
        check_model_source(str(tmp_path / "no-model"))


def test_an_uncached_hub_model_offline_suggests_the_offline_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="Hub is offline.*cpu_tiny"):
        check_model_source("someone/not-cached-model")


def _train_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "helpers.pipeline", "--profile", "cpu_tiny", "--notebooks", "01_train_lora",
            "-p", "run_dir", str(run_dir)]


def _kill_tree(process: subprocess.Popen) -> None:
    import psutil

    parent = psutil.Process(process.pid)
    for proc in [*parent.children(recursive=True), parent]:
        proc.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.notebook
def test_sigkill_then_rerun_gives_the_uninterrupted_result(tiny_run, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(_train_command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # killed once checkpoint-40 is complete (a folder of that name may still be being written: resume would start
    # from 20)
    while int(getattr(latest_checkpoint(run_dir / "checkpoints"), "name", "checkpoint-0").split("-")[1]) < 40:
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    _kill_tree(process)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert not (run_dir / "adapter").exists()

    subprocess.run(_train_command(run_dir), check=True, capture_output=True)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["metrics"]["resumed_from_step"] >= 40
    resumed, straight = read_train_log(run_dir / "train_log.csv"), read_train_log(tiny_run / "train_log.csv")
    assert [r["step"] for r in resumed] == list(range(1, 121))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), f"step {a['step']} differs"
    tuned, reference = load_file(run_dir / "adapter/adapter_model.safetensors"), load_file(
        tiny_run / "adapter/adapter_model.safetensors")
    assert tuned.keys() == reference.keys()
    for name in tuned:
        assert (tuned[name] - reference[name]).abs().max().item() <= 1e-6, name


@pytest.mark.notebook
def test_sigkill_of_an_overwrite_rerun_leaves_the_finished_run_whole(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "finished"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "eval.json").write_text('{"loss": 6.4}')  # as 03_evaluate leaves it
    kept = ("adapter", "train_log.csv", "run.json", "eval.json", "loss.png", "split.json", "checkpoints")
    before = {p.relative_to(run_dir).as_posix(): p.read_bytes() for name in kept
              for p in sorted([run_dir / name, *(run_dir / name).rglob("*")]) if p.is_file()}
    process = subprocess.Popen([*_train_command(run_dir), "-p", "overwrite", "true"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / ".replaced").is_dir() or latest_checkpoint(run_dir / "checkpoints") is None:
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    _kill_tree(process)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # the new run was under way

    result = subprocess.run(_train_command(run_dir), capture_output=True, text=True)  # the next run, no overwrite
    assert result.returncode != 0 and "holds a finished run" in result.stderr + result.stdout
    after = {p.relative_to(run_dir).as_posix(): p.read_bytes() for name in kept
             for p in sorted([run_dir / name, *(run_dir / name).rglob("*")]) if p.is_file()}
    assert after.keys() == before.keys() and all(after[name] == before[name] for name in before)
    assert not (run_dir / ".replaced").exists()


@pytest.mark.notebook
def test_same_seed_and_parameters_give_an_identical_training_log(tiny_run, tmp_path):
    subprocess.run(_train_command(tmp_path / "again"), check=True, capture_output=True)
    assert (tmp_path / "again/train_log.csv").read_text() == (tiny_run / "train_log.csv").read_text()


@pytest.mark.notebook
def test_a_finished_run_dir_stops_the_training_notebook(tiny_run, tmp_path):
    finished = tmp_path / "finished"  # a copy of the finished run's record: the shared run stays untouched
    finished.mkdir()
    (finished / "run.json").write_bytes((tiny_run / "run.json").read_bytes())
    result = subprocess.run(_train_command(finished), capture_output=True, text=True)
    assert result.returncode != 0 and "holds a finished run" in result.stderr + result.stdout
    assert json.loads((finished / "run.json").read_text())["status"] == "finished"


def test_out_of_memory_during_training_is_reported_with_advice_and_recorded(tmp_path):
    import torch

    from helpers.fine_tuning import train_and_record

    class OutOfMemoryTrainer:
        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def is_world_process_zero(self):
            return True

    config = RunConfig(run_dir=str(tmp_path), per_device_train_batch_size=8)
    with pytest.raises(RuntimeError, match=r"CUDA ran out of memory.*per_device_train_batch_size \(now 8\)"):
        train_and_record(OutOfMemoryTrainer(), None, None, config)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
