"""Where a run's time goes: stages timed and merged into run.json, training's time split by what the trainer did."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from helpers.monitoring import TrainingStages
from helpers.records import read_json, update_run_record
from helpers.timing import Stages, record_stages, recorded, stages_line, stages_markdown


def test_a_stage_timed_twice_adds_up_and_keeps_its_first_place():
    stages = Stages()
    stages.add("model loaded", 2.0)
    with stages.stage("training steps"):
        time.sleep(0.01)
    stages.add("model loaded", 1.0)
    assert list(stages.seconds) == ["model loaded", "training steps"]
    assert stages.seconds["model loaded"] == 3.0 and stages.seconds["training steps"] >= 0.01


def test_a_stage_is_timed_when_its_block_raises():
    stages = Stages()
    with pytest.raises(ValueError), stages.stage("export gguf"):
        raise ValueError("no llama.cpp")
    assert "export gguf" in stages.seconds


def test_recorded_stages_merge_into_run_json_and_a_rerun_replaces_its_own(tmp_path):
    update_run_record(tmp_path, status="finished", stages={"training steps": 10.0})
    record_stages(tmp_path, {"answers generated": 2.0})
    record_stages(tmp_path, {"answers generated": 3.0, "held-out rows scored": 4.0})
    record = read_json(tmp_path / "run.json")
    assert record["status"] == "finished"
    assert record["stages"] == {"training steps": 10.0, "answers generated": 3.0, "held-out rows scored": 4.0}
    assert "| training steps | 10.0 | 59% |" in stages_markdown(tmp_path)
    assert stages_line(record["stages"]).startswith("where the time went: training steps 10 s (59%), held-out")


def test_a_recorded_step_names_its_stage_from_its_arguments(tmp_path):
    @recorded("export {export_format}")
    def export_format(export_format, config):
        return export_format.upper()

    assert export_format("gguf", config=SimpleNamespace(run_dir=str(tmp_path))) == "GGUF"
    assert list(read_json(tmp_path / "run.json")["stages"]) == ["export gguf"]


def test_training_time_splits_into_steps_evaluation_and_checkpoints(monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 14.0, 16.5, 30.0, 31.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    watch = TrainingStages()  # 0.0
    for event in ("on_train_begin", "on_step_end", "on_log"):  # 10.0 (begin), 11.0, 14.0: a step and its log
        getattr(watch, event)(None, None, None)
    watch.on_evaluate(None, None, None, metrics={"eval_runtime": 2.0})  # at 16.5
    watch.on_save(None, None, None)  # at 30.0: 13.5 s since the evaluation ended
    assert watch.split(40.0) == {"training steps": 40.0 - 2.0 - 13.5, "in-training evaluation": 2.0,
                                 "checkpoints": 13.5}
