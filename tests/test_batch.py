"""Batch runs: plans expanded and validated up front, failures recorded, finished points skipped, one comparison."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import nbformat
import pytest
import yaml

import helpers.batch
from helpers.batch import load_plan, main, run_batch, write_summary
from helpers.batch_plan import TRAIN, expand, point_name
from helpers.config import RunConfig
from helpers.pipeline import run_notebook
from helpers.paths import PLANS
from tests.conftest import assert_token_in_no_file
from helpers.records import update_run_record, write_json, write_train_log

PNG = b"\x89PNG\r\n\x1a\n"
BROKEN = {"dataset": "no/such/file.jsonl"}


def write_plan(tmp_path: Path, **spec) -> Path:
    """A plan file in tmp_path whose batch folder is tmp_path/out/<name>."""
    spec = {"profile": "cpu_tiny", "output_dir": str(tmp_path / "out"), **spec}
    path = tmp_path / f"{spec.pop('stem', 'plan')}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_summary(result) -> dict[str, dict[str, str]]:
    with result.summary_csv.open(newline="") as handle:
        return {row["point"]: row for row in csv.DictReader(handle)}


# --- plans ---------------------------------------------------------------------------------------------------

def test_grid_is_crossed_then_extra_points_each_named_from_its_values(tmp_path):
    plan = load_plan(write_plan(tmp_path, stem="sweep", fixed={"max_steps": 3},
                                grid={"learning_rate": [0.005, 0.002], "lora_r": [8, 16]}, points=[BROKEN]))
    assert plan.name == "sweep" and plan.out_dir == tmp_path / "out" / "sweep"
    assert [p.name for p in plan.points] == ["lr0.005_r8", "lr0.005_r16", "lr0.002_r8", "lr0.002_r16", "data-file"]
    assert plan.varied == ("learning_rate", "lora_r", "dataset")
    first, broken = plan.points[0], plan.points[-1]
    assert first.run_dir == plan.out_dir / "lr0.005_r8"
    assert first.params["max_steps"] == 3 and first.params["lora_r"] == 8 and first.params["learning_rate"] == 0.005
    assert first.params["model_name"] == "outputs/_models/tiny-llama"  # from the base profile
    assert broken.config.lora_r == 16 and broken.config.dataset == BROKEN["dataset"]  # profile values, one changed


def test_expand_crosses_lists_first_key_slowest():
    assert expand({"a": [1, 2], "b": ["x", "y", "z"]}, []) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
        {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]
    assert expand({}, [{"lora_r": 4}]) == [{"lora_r": 4}]
    assert expand({}, []) == [{}]


def test_point_names_are_short_and_safe_for_folders():
    assert point_name({"learning_rate": 2e-4, "lora_r": 64}) == "lr0.0002_r64"
    assert point_name({"dataset": "HumanLLMs/Human-Like-DPO-Dataset"}) == "data-Human-Like-DPO-Dataset"
    assert point_name({"dataset": "helpers/data/sample_dpo.jsonl", "packing": True}) == "data-sample-dpo_packing-True"
    assert point_name({"target_modules": ["q_proj", "v_proj"], "max_steps": None}) == "modules-q-proj+v-proj_steps-None"
    assert point_name({}) == "base"


def test_same_looking_values_get_distinct_run_dirs_and_repeated_points_are_refused(tmp_path):
    plan = load_plan(write_plan(tmp_path, grid={"dataset": ["a/data.jsonl", "b/data.jsonl"]}))
    assert len({p.run_dir for p in plan.points}) == 2
    with pytest.raises(ValueError, match="appears twice"):
        load_plan(write_plan(tmp_path, grid={"lora_r": [8, 8]}))


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"learnig_rate": [0.1]}}, r"point 'learnig_rate0.1'.*'learnig_rate' \(did you mean 'learning_rate'\?\)"),
    ({"grid": {"lora_r": [8, 0]}}, r"point 'r0'.*lora_r = 0 is invalid"),
    ({"points": [{"optim": "adam"}]}, r"point 'optim-adam'.*optim 'adam' is unknown; choose one of"),
    ({"fixed": {"max_step": 5}}, r"fixed: unknown parameter.*did you mean 'max_steps'"),
    ({"fixed": {"run_dir": "x"}}, r"batch names each point's run_dir"),
    ({"grid": {"lora_r": 8}}, r"grid 'lora_r' must be a non-empty list"),
    ({"gird": {"lora_r": [8]}}, r"unknown plan key\(s\) 'gird'"),
    ({"profile": "cpu_tine"}, r"profile 'cpu_tine' is unknown"),
    ({"notebooks": TRAIN}, r"notebooks must be a list"),
])
def test_a_bad_plan_fails_at_once_naming_the_point_and_the_parameter(tmp_path, monkeypatch, spec, message):
    calls = []
    monkeypatch.setattr(helpers.batch, "run_notebook", lambda *args: calls.append(args))
    with pytest.raises(ValueError, match=message):
        run_batch(write_plan(tmp_path, **spec))
    assert calls == [] and not (tmp_path / "out").exists()


def test_an_unknown_notebook_fails_before_any_point_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(helpers.batch, "run_notebook", lambda *args: calls.append(args))
    plan = write_plan(tmp_path, notebooks=[TRAIN, "09_nothing"], grid={"lora_r": [8, 16]})
    assert len(load_plan(plan).points) == 2  # names are checked against notebooks/ only when the batch runs
    with pytest.raises(ValueError, match=r"'09_nothing' not in .*choose from: 00_setup, 01_train_lora"):
        run_batch(plan)
    assert calls == []


def test_shipped_plans_are_valid():
    for path in sorted(PLANS.glob("*.yaml")):
        plan = load_plan(path)
        assert len(plan.points) == 4 and plan.varied == ("learning_rate", "lora_r"), path.name
    assert RunConfig.batch_plan == "notebooks/plans/cpu_tiny_grid.yaml" and (PLANS / "cpu_tiny_grid.yaml").exists()


# --- the runner, with notebooks faked (fast) -------------------------------------------------------------------

@pytest.fixture
def project_root(tmp_path, monkeypatch):
    """A project root of the test's own, without the offline tiny model until the faked setup notebook builds it."""
    root = tmp_path / "project"
    monkeypatch.setattr(helpers.batch, "PROJECT_ROOT", root)
    return root


def fake_notebooks(calls: list):
    """Stands in for run_notebook: records the call, 'trains' by writing what the training notebook writes."""
    def run(name, params, out_dir, progress_bar=True):
        calls.append((name, out_dir.name))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.ipynb").write_text("{}")
        if name == "00_setup":
            model = helpers.batch.PROJECT_ROOT / params["model_name"]
            model.mkdir(parents=True)
            (model / "config.json").write_text("{}")
            return
        if not Path(params["dataset"]).exists():
            raise FileNotFoundError(f"dataset file {params['dataset']!r} does not exist")
        if name == TRAIN:
            losses = [3.0 - step * params["learning_rate"] * 10 for step in range(1, 6)]
            write_train_log(out_dir / "train_log.csv", [{"step": s, "loss": v} for s, v in enumerate(losses, 1)])
            update_run_record(out_dir, status="finished", parameters=RunConfig.from_dict(params).to_dict(),
                              metrics={"final_loss": losses[-1], "train_runtime_s": 1.0, "tokens_per_s": 100.0,
                                       "peak_rss_gib": 0.5})
    return run


def test_failures_are_recorded_finished_points_skipped_the_rest_rerun(tmp_path, monkeypatch, project_root):
    calls = []
    monkeypatch.setattr(helpers.batch, "run_notebook", fake_notebooks(calls))
    plan = write_plan(tmp_path, grid={"learning_rate": [0.01, 0.02]}, points=[BROKEN])
    result = run_batch(plan)
    assert result.ran == ["lr0.01", "lr0.02", "data-file"]
    assert calls[0] == ("00_setup", "_setup") and [c for c, _ in calls].count("00_setup") == 1  # built once, first
    rows = read_summary(result)
    assert {k: r["status"] for k, r in rows.items()} == {"lr0.01": "finished", "lr0.02": "finished",
                                                         "data-file": "failed"}
    assert "FileNotFoundError" in rows["data-file"]["error"] and rows["lr0.01"]["error"] == ""
    assert rows["lr0.02"]["final_loss"] == "2.0" and rows["lr0.02"]["best_loss"] == "2.0"
    assert "Lowest final training loss (`final_loss`): **lr0.02**" in result.summary_md.read_text()

    calls.clear()
    assert run_batch(plan, retry_failed=False).ran == [] and calls == []
    assert run_batch(plan).ran == ["data-file"]  # a failed point is tried again by default
    # An interrupted point (run.json still 'running') is run again; the training notebook resumes it.
    update_run_record(tmp_path / "out/plan/lr0.01", status="running")
    calls.clear()
    assert run_batch(plan, retry_failed=False).ran == ["lr0.01"] and calls == [(TRAIN, "lr0.01")]


def test_a_plan_edited_after_its_runs_is_refused_before_anything_runs(tmp_path, monkeypatch, project_root):
    calls = []
    monkeypatch.setattr(helpers.batch, "run_notebook", fake_notebooks(calls))
    run_batch(write_plan(tmp_path, fixed={"max_steps": 5}, grid={"lora_r": [8]}))
    calls.clear()
    with pytest.raises(ValueError, match=r"point 'r8': .* other parameters \(max_steps 5 there, 7 in the plan\)"):
        run_batch(write_plan(tmp_path, fixed={"max_steps": 7}, grid={"lora_r": [8]}))
    assert calls == []


def test_summary_has_eval_figures_when_present_and_extra_log_columns_are_tolerated(tmp_path, monkeypatch, project_root):
    monkeypatch.setattr(helpers.batch, "run_notebook", fake_notebooks([]))
    plan = load_plan(write_plan(tmp_path, grid={"learning_rate": [0.01, 0.02]}))
    run_batch(plan)
    assert "tuned_loss" not in read_summary(write_summary(plan))["lr0.01"]
    run_dir = plan.points[0].run_dir
    (run_dir / "train_log.csv").write_text("step,loss,learning_rate,grad_norm,epoch,eval_loss\n"
                                           "1,3.0,0.01,1.0,0.1,\n2,2.5,0.01,1.0,0.2,2.75\n")
    figures = {"loss": 2.25, "perplexity": 9.5, "preference_accuracy": 0.625, "mean_margin": 0.1}
    write_json(run_dir / "eval.json", {"rows": 8, "base": figures, "tuned": figures})
    result = write_summary(plan)
    row = read_summary(result)["lr0.01"]
    assert (row["eval_loss"], row["tuned_loss"], row["tuned_preference_accuracy"]) == ("2.75", "2.25", "0.625")
    assert read_summary(result)["lr0.02"]["tuned_loss"] == ""
    assert "held-out loss after training (03_evaluate) (`tuned_loss`): **lr0.01**" in result.markdown
    assert result.chart.read_bytes()[:8] == PNG


def test_command_line_runs_the_plan_and_prints_the_comparison(tmp_path, monkeypatch, capsys, project_root):
    package_log = logging.getLogger("helpers")
    monkeypatch.setattr(package_log, "handlers", [])  # main adds its terminal handler; dropped after the test
    monkeypatch.setattr(package_log, "level", package_log.level)
    monkeypatch.setattr(helpers.batch, "run_notebook", fake_notebooks([]))
    main([str(write_plan(tmp_path, grid={"lora_r": [8, 16]}))])
    out = capsys.readouterr().out
    assert "| r8 | 8 | finished |" in out and "Ran 2 point(s)" in out and "summary.md" in out
    main([str(tmp_path / "plan.yaml"), "--summary-only"])
    assert "Ran 0 point(s)" in capsys.readouterr().out


# --- the real thing: the shipped offline plan through papermill ------------------------------------------------

@pytest.mark.notebook
def test_offline_plan_runs_records_a_broken_point_and_a_second_run_runs_nothing_new(tmp_path):
    spec = yaml.safe_load((PLANS / "cpu_tiny_grid.yaml").read_text())
    spec["fixed"].update(max_steps=4, save_steps=2)  # a few steps: each point costs mostly its notebook's imports
    plan = write_plan(tmp_path, **{**spec, "name": "grid", "points": [BROKEN]})

    result = run_batch(plan)
    names = ["lr0.005_r8", "lr0.005_r16", "lr0.002_r8", "lr0.002_r16", "data-file"]
    assert result.ran == names
    rows = read_summary(result)
    assert list(rows) == names, "one row per point, in plan order"
    assert {n: rows[n]["status"] for n in names} == {**{n: "finished" for n in names[:4]}, "data-file": "failed"}
    assert "no/such/file.jsonl" in rows["data-file"]["error"] and "does not exist" in rows["data-file"]["error"]
    for name in names[:4]:
        assert float(rows[name]["final_loss"]) > 0 and float(rows[name]["tokens_per_s"]) > 0
        assert (result.plan.out_dir / name / f"{TRAIN}.ipynb").is_file()
        assert float(rows[name]["best_loss"]) <= float(rows[name]["final_loss"])
    assert (result.plan.out_dir / "data-file" / f"{TRAIN}.ipynb").is_file(), "the failed notebook is kept to read"
    assert "| data-file |" in result.summary_md.read_text() and "Failed points" in result.summary_md.read_text()
    assert result.chart.read_bytes()[:8] == PNG

    # Again, through the batch notebook: finished points are not touched; only the failed one is tried again.
    executed = {n: (result.plan.out_dir / n / f"{TRAIN}.ipynb").stat().st_mtime_ns for n in names}
    notebook = run_notebook("05_batch", {"batch_plan": str(plan)}, tmp_path / "nb")
    again = {n: (result.plan.out_dir / n / f"{TRAIN}.ipynb").stat().st_mtime_ns for n in names}
    assert {n: again[n] for n in names[:4]} == {n: executed[n] for n in names[:4]}
    assert again["data-file"] != executed["data-file"]
    outputs = [o for c in nbformat.read(notebook, as_version=4).cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "ran 1 point(s): data-file" in text
    shown = [o["data"] for o in outputs if "data" in o]
    assert any("image/png" in d for d in shown), "the notebook shows the loss curves inline"
    table = "| lr0.005_r8 | 0.005 | 8 | helpers/data/sample_dpo.jsonl | finished |"
    assert any(table in d.get("text/markdown", "") for d in shown), "the notebook shows the summary table inline"
    assert json.loads((result.plan.out_dir / "data-file" / "batch_point.json").read_text())["status"] == "failed"
    assert assert_token_in_no_file(tmp_path) > 10, "the Hub token leaked into a batch file"
