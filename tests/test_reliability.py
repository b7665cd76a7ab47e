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
from helpers.fine_tuning import out_of_memory_advice, prepare_run
from helpers.modeling import check_model_source
from helpers.monitoring import NonFiniteLossError, StopOnNonFiniteLoss
from helpers.records import latest_checkpoint, read_json, read_train_log
from helpers.run_guard import (
    ALTERS_OPTIMIZATION,
    LEAVES_OPTIMIZATION,
    RunExistsError,
    check_run_dir,
    complete_overwrite,
    staging_folder,
)
from tests.conftest import TINY_RUN


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
    old = _finished_run(run_dir)
    with pytest.raises(RunExistsError, match="holds a finished run.*overwrite=True"):
        check_run_dir(RunConfig(run_dir=str(run_dir)))
    assert check_run_dir(RunConfig(run_dir=str(run_dir), overwrite=True)) == staging_folder(run_dir)
    assert _files(run_dir) == old  # the new run trains beside it; the finished run stays whole until then


def _finished_run(run_dir: Path) -> dict[str, bytes]:
    """A finished run's files, its TensorBoard events among them, and an executed notebook beside them; returns
    {relative name: bytes} to compare with later."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter/adapter_model.safetensors").write_bytes(b"old weights")
    (run_dir / "train_log.csv").write_text("step,loss\n1,2.5\n")
    (run_dir / "eval.json").write_text('{"loss": 2.4}')
    (run_dir / "tb").mkdir()
    (run_dir / "tb/events.out.tfevents.old").write_bytes(b"old events")
    (run_dir / "02_inference.ipynb").write_text("{}")
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "parameters": {"max_steps": 1}}))
    return _files(run_dir)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _new_run(folder: Path, status: str) -> dict[str, bytes]:
    """What a new run writes where it trains (its record, a checkpoint, TensorBoard events); returns its files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"status": status, "parameters": RunConfig().to_dict()}))
    if not (folder / "checkpoints").exists():
        _checkpoint(folder / "checkpoints", 20)
    (folder / "tb").mkdir(exist_ok=True)
    (folder / "tb/events.out.tfevents.new").write_bytes(b"new events")
    return _files(folder)


def test_an_overwrite_trains_beside_the_finished_run_resumes_there_and_takes_its_place_at_the_end(tmp_path):
    run_dir = tmp_path / "run"
    old = _finished_run(run_dir)
    config = RunConfig(run_dir=str(run_dir), overwrite=True)
    staged = check_run_dir(config)
    _new_run(staged, "running")  # then killed
    assert _files(run_dir) == old
    with pytest.raises(RunExistsError, match=r"unfinished overwrite in .*resumes with overwrite=True"):
        check_run_dir(RunConfig(run_dir=str(run_dir)))
    assert check_run_dir(config) == staged and latest_checkpoint(staged / "checkpoints") is not None  # kept
    new = _new_run(staged, "finished")
    assert _files(run_dir) == old  # finished, not yet in place: the old run is still whole
    assert complete_overwrite(run_dir)
    # The new run's files only (its own tb/, not the old events), and the executed notebook that was beside them.
    assert _files(run_dir) == {**new, "02_inference.ipynb": b"{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the replaced run is dropped, nothing left beside


def _killed_at(call: int, target):
    """Run target with the call-th filesystem step of complete_overwrite (a rename or the removal of the replaced
    run) raising as a kill would stop it there; True when the kill point was reached."""
    import shutil

    steps = {"count": 0}
    rename, rmtree = Path.rename, shutil.rmtree

    def step(original):
        def wrapped(*args, **kwargs):
            steps["count"] += 1
            if steps["count"] == call:
                raise KeyboardInterrupt("killed")
            return original(*args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", step(rename))
        patch.setattr(shutil, "rmtree", step(rmtree))
        try:
            target()
        except KeyboardInterrupt:
            return True
    return False


@pytest.mark.parametrize("kill_at", range(1, 6))
def test_a_kill_at_any_step_of_taking_the_place_leaves_a_whole_run_and_the_next_look_completes_it(tmp_path,
                                                                                                  kill_at):
    from helpers.config import run_config

    run_dir = tmp_path / "run"
    old = _finished_run(run_dir)
    staged = check_run_dir(RunConfig(run_dir=str(run_dir), overwrite=True))
    new = _new_run(staged, "finished")
    # The steps: the executed notebook carried over, a stale replaced folder cleared, the old run renamed aside,
    # the new one renamed in, the old one dropped.
    assert _killed_at(kill_at, lambda: complete_overwrite(run_dir))
    whole = [_run_files(old), _run_files(new)] + ([{}] if kill_at == 4 else [])  # 4: between the two renames
    assert _run_files(_files(run_dir)) in whole, "neither run whole in run_dir"
    config = run_config({"run_dir": str(run_dir)})  # what 02, 03 and 04 do first
    assert config.run_dir == str(run_dir) and read_json(run_dir / "run.json")["status"] == "finished"
    assert _files(run_dir) == {**new, "02_inference.ipynb": b"{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def _run_files(files: dict[str, bytes]) -> dict[str, bytes]:
    from helpers.records import RUN_FILES

    return {name: data for name, data in files.items() if name.split("/")[0] in RUN_FILES}


def test_an_overwrite_that_fails_leaves_the_finished_run_and_keeps_its_own_checkpoints(tmp_path):
    import dataclasses

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
    staged = check_run_dir(config)
    _new_run(staged, "running")
    with pytest.raises(RuntimeError, match="CUDA ran out of memory"):
        train_and_record(FailingTrainer(), None, None, dataclasses.replace(config, run_dir=str(staged)))
    assert _files(run_dir) == old
    assert read_json(staged / "run.json")["status"] == "failed" and latest_checkpoint(staged / "checkpoints")


def test_an_interrupted_run_keeps_its_checkpoints_unless_resume_is_never(tmp_path):
    run_dir = tmp_path / "run"
    _new_run(run_dir, "running")
    assert check_run_dir(RunConfig(run_dir=str(run_dir))) == run_dir
    assert latest_checkpoint(run_dir / "checkpoints") is not None
    check_run_dir(RunConfig(run_dir=str(run_dir), resume="never"))
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "tb").exists()  # its events go with it


def test_every_parameter_is_classified_as_altering_the_optimization_or_not():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert not ALTERS_OPTIMIZATION & LEAVES_OPTIMIZATION
    assert ALTERS_OPTIMIZATION | LEAVES_OPTIMIZATION == fields, (
        f"classify in helpers.run_guard: {sorted(fields - ALTERS_OPTIMIZATION - LEAVES_OPTIMIZATION)}; "
        f"no such parameter: {sorted((ALTERS_OPTIMIZATION | LEAVES_OPTIMIZATION) - fields)}")


ROWS = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(10)]


def _interrupted(tmp_path, **rows) -> RunConfig:
    """A run interrupted after its step-20 checkpoint, recorded as prepare_run records it; its config."""
    config = RunConfig(model_name=str(tmp_path), run_dir=str(tmp_path / "run"), precision="fp32")
    prepare_run(config, **rows)
    _checkpoint(tmp_path / "run/checkpoints", 20)
    return config


@pytest.mark.parametrize("change, shown", [
    ({"learning_rate": 1e-3}, "learning_rate 0.0002 -> 0.001"),
    ({"dataset": "other.jsonl"}, "dataset 'HumanLLMs/Human-Like-DPO-Dataset' -> 'other.jsonl'"),
    ({"beta": 0.5}, "beta 0.1 -> 0.5"),  # DPO's own
])
def test_a_resume_is_refused_when_a_parameter_that_changes_the_training_changed(tmp_path, change, shown):
    import dataclasses

    config = _interrupted(tmp_path)
    changed = dataclasses.replace(config, **change)
    with pytest.raises(ValueError) as refusal:
        prepare_run(changed)
    message = str(refusal.value)
    assert f"other parameters that change the training: {shown};" in message and "\n" not in message
    assert "Set overwrite=True to discard it and start afresh, or choose another run_dir" in message
    assert latest_checkpoint(tmp_path / "run/checkpoints") is not None  # nothing touched
    assert read_json(tmp_path / "run/run.json")["parameters"] == config.to_dict()
    prepare_run(dataclasses.replace(changed, overwrite=True))  # the way out: start afresh there
    assert latest_checkpoint(tmp_path / "run/checkpoints") is None
    assert read_json(tmp_path / "run/run.json")["parameters"] == dataclasses.replace(changed, overwrite=True).to_dict()


def test_a_resume_on_other_rows_of_the_same_dataset_is_refused(tmp_path):
    config = _interrupted(tmp_path, rows=ROWS)
    edited = [dict(row) for row in ROWS]
    edited[3]["chosen"] = "edited in place"
    with pytest.raises(ValueError, match=r"dataset content '10 rows, sha256 \w{12}' -> '10 rows, sha256 \w{12}'"):
        prepare_run(config, rows=edited)
    assert latest_checkpoint(tmp_path / "run/checkpoints") is not None


def test_a_rerun_that_changes_only_what_leaves_the_training_alone_resumes(tmp_path):
    import dataclasses

    config = _interrupted(tmp_path)
    later = dataclasses.replace(config, max_new_tokens=32, prompts=["Hi?"], logging_steps=5, report_to="tensorboard",
                                micro_batching="recipe", kit_repo="https://example.org/kit.git")
    prepare_run(later)
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "checkpoint-20"
    assert read_json(tmp_path / "run/run.json")["parameters"]["max_new_tokens"] == 32


def test_an_interrupted_run_without_a_checkpoint_starts_afresh_whatever_changed(tmp_path):
    import dataclasses

    config = RunConfig(model_name=str(tmp_path), run_dir=str(tmp_path / "run"), precision="fp32")
    prepare_run(config)
    prepare_run(dataclasses.replace(config, learning_rate=1e-3))  # nothing to resume: no refusal
    assert read_json(tmp_path / "run/run.json")["parameters"]["learning_rate"] == 1e-3


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
    """Training as tiny_run trained, into run_dir."""
    overrides = [arg for name, value in TINY_RUN.items() for arg in ("-p", name, str(value))]
    return [sys.executable, "-m", "helpers.pipeline", "--profile", "cpu_tiny", "--notebooks", "01_train_lora",
            *overrides, "-p", "run_dir", str(run_dir)]


def _kill_tree(process: subprocess.Popen) -> None:
    import psutil

    parent = psutil.Process(process.pid)
    for proc in [*parent.children(recursive=True), parent]:
        proc.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.notebook
def test_sigkill_of_an_overwrite_leaves_the_finished_run_usable_and_the_rerun_resumes_it_exactly(tiny_run, tmp_path):
    """An overwrite=True rerun of a finished run (with TensorBoard on), SIGKILLed once its first checkpoint is
    complete: the finished run is in place byte for byte, 02_inference answers from it, and the next call resumes
    the new run from that checkpoint to the result of a run never interrupted (tiny_run's), which then takes run_dir
    with its own tb/ alone."""
    import shutil

    from safetensors.torch import load_file

    from helpers.pipeline import run_notebook
    from helpers.run_guard import staging_folder

    run_dir = tmp_path / "finished"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "eval.json").write_text('{"loss": 6.4}')  # as 03_evaluate leaves it
    (run_dir / "tb").mkdir()
    (run_dir / "tb/events.out.tfevents.old").write_bytes(b"the finished run's events")
    before, staged = _files(run_dir), staging_folder(run_dir)
    overwrite = [*_train_command(run_dir), "-p", "overwrite", "true", "-p", "report_to", "tensorboard"]
    process = subprocess.Popen(overwrite, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while latest_checkpoint(staged / "checkpoints") is None:
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    _kill_tree(process)
    first = int(latest_checkpoint(staged / "checkpoints").name.split("-")[1])
    assert read_json(staged / "run.json")["status"] == "running" and any((staged / "tb").rglob("*tfevents*"))
    after = _files(run_dir)
    for name in ("adapter/adapter_model.safetensors", "train_log.csv", "loss.png", "run.json", "eval.json"):
        assert after[name] == before[name], f"{name} changed"
    assert _run_files(after) == _run_files(before)  # every file of the finished run, its tb/ too

    run_notebook("02_inference", {"run_dir": str(run_dir), "max_new_tokens": 8}, tmp_path / "inference")
    assert len((run_dir / "generations.jsonl").read_text().splitlines()) == len(RunConfig().prompts)

    subprocess.run(overwrite, check=True, capture_output=True)
    record = read_json(run_dir / "run.json")
    assert record["status"] == "finished" and record["metrics"]["resumed_from_step"] == first
    resumed, straight = read_train_log(run_dir / "train_log.csv"), read_train_log(tiny_run / "train_log.csv")
    assert [r["step"] for r in resumed] == list(range(1, 121))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), f"step {a['step']} differs"
    tuned, reference = load_file(run_dir / "adapter/adapter_model.safetensors"), load_file(
        tiny_run / "adapter/adapter_model.safetensors")
    assert tuned.keys() == reference.keys()
    for name in tuned:
        assert (tuned[name] - reference[name]).abs().max().item() <= 1e-6, name
    assert not (run_dir / "tb/events.out.tfevents.old").exists() and any((run_dir / "tb").rglob("*tfevents*"))
    assert not (run_dir / "eval.json").exists()  # the replaced run's evaluation went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished", "inference"]  # nothing left beside run_dir


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


def test_records_leave_the_umask_alone_and_write_files_as_open_would(tmp_path, monkeypatch):
    import importlib
    import os

    import helpers.records

    calls = []
    monkeypatch.setattr(os, "umask", lambda *args: calls.append(args) or 0o022)
    importlib.reload(helpers.records)
    helpers.records.atomic_write_text(tmp_path / "a.txt", "x")
    assert calls == []  # reading the umask through os.umask sets it, for every thread of the process
    monkeypatch.undo()
    before = os.umask(0o027)
    try:
        helpers.records.atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(before)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary left behind
