"""Batch runs: plans expanded and validated up front, failures recorded, finished points skipped, one comparison."""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import threading
import time
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
from helpers.records import read_train_log, update_run_record, write_json, write_train_log

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
    ({"workers": 0}, r"workers 0 is invalid; it must be a positive number of points run at once, or 'auto'"),
    ({"workers": "all"}, r"workers 'all' is invalid"),
    ({"workers": "-2"}, r"workers '-2' is invalid"),
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


def test_the_parallel_setting_is_checked_in_the_notebook_parameters_and_on_the_command_line(tmp_path, capsys):
    assert [RunConfig(batch_workers=v).batch_workers for v in (4, "4", "auto", "")] == [4, "4", "auto", ""]
    with pytest.raises(ValueError, match=r"batch_workers = 0 is invalid; it must be '' \(the plan's workers\), 'auto'"):
        RunConfig(batch_workers=0)
    with pytest.raises(SystemExit):
        main([str(write_plan(tmp_path)), "--workers", "-1"])
    assert "argument --workers: workers '-1' is invalid" in capsys.readouterr().err


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


def test_points_in_parallel_without_ray_installed_is_an_error_before_anything_runs(tmp_path, monkeypatch,
                                                                                  project_root):
    calls = []
    monkeypatch.setattr(helpers.batch, "run_notebook", fake_notebooks(calls))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    with pytest.raises(ModuleNotFoundError, match="needs Ray, which is not installed here: pip install the ray line"):
        run_batch(write_plan(tmp_path, grid={"lora_r": [8, 16]}), workers=2)
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


# --- the real thing: the shipped offline plan through papermill, one point at a time and through Ray -------------

GRID = ["lr0.005_r8", "lr0.005_r16", "lr0.002_r8", "lr0.002_r16", "data-file"]
KILLED = GRID[0]  # its worker is killed while it trains, in the parallel run
TIMING = {"runtime_s", "tokens_per_s", "peak_rss_gib", "peak_gpu_gib", "run_dir"}  # differ between any two runs


@pytest.fixture(scope="module")
def grid_plan(tmp_path_factory) -> Path:
    """The shipped offline plan cut to a few steps, plus a point that fails (its data file is missing)."""
    spec = yaml.safe_load((PLANS / "cpu_tiny_grid.yaml").read_text())
    spec["fixed"].update(max_steps=4, save_steps=2)  # a few steps: each point costs mostly its notebook's imports
    return write_plan(tmp_path_factory.mktemp("batch"), **{**spec, "name": "grid", "points": [BROKEN]})


@pytest.fixture(scope="module")
def sequential_grid(grid_plan):
    """The grid one point at a time, each kernel on one thread, as each point of the parallel run (two workers on
    two cores) gets: the same thread count gives the same floats."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return run_batch(grid_plan, workers=1)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for this module, 2 CPUs wherever the suite runs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def kill_worker_while_training(run_dir: Path, killed: list[int]) -> None:
    """Once the point's training has started, SIGKILL the Ray worker running it and the kernel under it."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline:
        record, run = run_dir / "batch_point.json", run_dir / "run.json"
        try:
            pid = json.loads(record.read_text())["pid"] if record.exists() else None
            training = run.exists() and json.loads(run.read_text())["status"] == "running"
        except (json.JSONDecodeError, KeyError):  # a file being replaced: look again
            pid, training = None, False
        if pid and training:
            worker = psutil.Process(pid)
            for process in [worker, *worker.children(recursive=True)]:
                process.kill()
                killed.append(process.pid)
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def parallel_grid(local_ray, grid_plan):
    """The same grid through Ray, two points at once, the first point's worker killed while it trains; then the
    plan run again. Returns both results and the killed process ids."""
    out_root, killed = grid_plan.parent / "parallel", []
    killer = threading.Thread(target=kill_worker_while_training, args=(out_root / "grid" / KILLED, killed))
    killer.start()
    first = run_batch(grid_plan, out_root=out_root, workers=2)
    killer.join()
    return first, run_batch(grid_plan, out_root=out_root, workers=2), killed


@pytest.mark.notebook
def test_offline_plan_runs_records_a_broken_point_and_a_second_run_runs_nothing_new(grid_plan, sequential_grid,
                                                                                    local_ray, monkeypatch):
    result = sequential_grid
    assert result.ran == GRID
    rows = read_summary(result)
    assert list(rows) == GRID, "one row per point, in plan order"
    assert {n: rows[n]["status"] for n in GRID} == {**{n: "finished" for n in GRID[:4]}, "data-file": "failed"}
    assert "no/such/file.jsonl" in rows["data-file"]["error"] and "does not exist" in rows["data-file"]["error"]
    for name in GRID[:4]:
        assert float(rows[name]["final_loss"]) > 0 and float(rows[name]["tokens_per_s"]) > 0
        assert (result.plan.out_dir / name / f"{TRAIN}.ipynb").is_file()
        assert float(rows[name]["best_loss"]) <= float(rows[name]["final_loss"])
    assert (result.plan.out_dir / "data-file" / f"{TRAIN}.ipynb").is_file(), "the failed notebook is kept to read"
    assert "| data-file |" in result.summary_md.read_text() and "Failed points" in result.summary_md.read_text()
    assert result.chart.read_bytes()[:8] == PNG

    # Again, through the batch notebook, two points at once on the module's Ray (its address as a user's cluster):
    # finished points are not touched; only the failed one is tried again.
    executed = {n: (result.plan.out_dir / n / f"{TRAIN}.ipynb").stat().st_mtime_ns for n in GRID}
    monkeypatch.setenv("RAY_ADDRESS", local_ray.get_runtime_context().gcs_address)
    notebook = run_notebook("05_batch", {"batch_plan": str(grid_plan), "batch_workers": 2}, grid_plan.parent / "nb")
    again = {n: (result.plan.out_dir / n / f"{TRAIN}.ipynb").stat().st_mtime_ns for n in GRID}
    assert {n: again[n] for n in GRID[:4]} == {n: executed[n] for n in GRID[:4]}
    assert again["data-file"] != executed["data-file"]
    outputs = [o for c in nbformat.read(notebook, as_version=4).cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "ran 1 point(s): data-file" in text
    assert "batch grid: 100%" in text and "running none; 1 failed" in text, "the bar shows running and failed points"
    shown = [o["data"] for o in outputs if "data" in o]
    assert any("image/png" in d for d in shown), "the notebook shows the loss curves inline"
    table = "| lr0.005_r8 | 0.005 | 8 | helpers/data/sample_dpo.jsonl | finished |"
    assert any(table in d.get("text/markdown", "") for d in shown), "the notebook shows the summary table inline"
    record = json.loads((result.plan.out_dir / "data-file" / "batch_point.json").read_text())
    assert record["status"] == "failed" and record["pid"] != os.getpid(), "run in a Ray worker"
    assert assert_token_in_no_file(grid_plan.parent) > 10, "the Hub token leaked into a batch file"


@pytest.mark.notebook
def test_two_workers_give_the_sequential_training_logs_and_summary(sequential_grid, parallel_grid):
    _, parallel, _ = parallel_grid
    for name in GRID[1:4]:  # each point trained straight through: the very same log
        assert ((parallel.plan.out_dir / name / "train_log.csv").read_text()
                == (sequential_grid.plan.out_dir / name / "train_log.csv").read_text()), name
    # The killed point trained again from the start or resumed from a checkpoint: the same losses, to float noise.
    resumed, straight = (read_train_log(r.plan.out_dir / KILLED / "train_log.csv") for r in (parallel, sequential_grid))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), f"step {a['step']}"
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in parallel.rows] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in sequential_grid.rows]
    assert parallel.markdown.split("| point |")[0] == sequential_grid.markdown.split("| point |")[0]
    assert parallel.chart.read_bytes()[:8] == PNG


@pytest.mark.notebook
def test_a_killed_worker_fails_its_point_the_others_go_on_and_a_rerun_runs_only_it(parallel_grid):
    first, again, killed = parallel_grid
    assert len(killed) == 2, "the worker and its kernel were killed while the point trained"
    assert first.ran == GRID
    statuses, errors = ({r["point"]: r[key] for r in first.rows} for key in ("status", "error"))
    assert statuses == {KILLED: "failed", **{n: "finished" for n in GRID[1:4]}, "data-file": "failed"}, errors
    error = errors[KILLED]
    assert "its Ray worker died" in error and "resumes its training" in error
    run_dir = first.plan.out_dir / KILLED
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"  # after the rerun
    assert again.ran == [KILLED, "data-file"], "finished points are skipped, failed ones tried again"
    assert {r["point"]: r["status"] for r in again.rows} == {**{n: "finished" for n in GRID[:4]}, "data-file": "failed"}


@pytest.mark.notebook
def test_an_edited_plan_is_refused_before_any_worker_starts(grid_plan, parallel_grid):
    first, _, _ = parallel_grid
    executed = {n: (first.plan.out_dir / n / f"{TRAIN}.ipynb").stat().st_mtime_ns for n in GRID}
    spec = yaml.safe_load(grid_plan.read_text())
    spec["fixed"]["max_steps"] = 5
    edited = grid_plan.with_name("edited.yaml")
    edited.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=rf"point '{KILLED}': .* other parameters \(max_steps 4 there, 5 in the plan"):
        run_batch(edited, out_root=grid_plan.parent / "parallel", workers=2)
    assert {n: (first.plan.out_dir / n / f"{TRAIN}.ipynb").stat().st_mtime_ns for n in GRID} == executed
