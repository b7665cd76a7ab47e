"""Batch runs: a plan's parameter grid run point by point through papermill, then one comparison of every point.

A plan (YAML, see notebooks/plans/) names a base profile, fixed overrides, a grid (lists are crossed) and optional
extra points, and the notebooks to run per point. Each point gets its own run_dir, outputs/<batch>/<point>, named
from the values it sets. A failed point is recorded and the batch goes on; running the plan again skips finished
points and re-runs the others (the training notebook resumes from its newest checkpoint by itself). With workers
above 1 (or 'auto' on a machine with several GPUs, or a Ray cluster's address) points run several at once as Ray
tasks (helpers.batch_ray); see docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.batch_plan import TRAIN, Plan, Point, check_notebooks, check_workers, load_plan
from helpers.batch_ray import import_ray, run_points, use_ray
from helpers.config import RunConfig
from helpers.environment import mount_drive_if_needed
from helpers.local_models import TINY_MODEL_DIR
from helpers.pipeline import notebook_parameter_names, run_notebook, use_offline_hub_when_local
from helpers.plotting import moving_average
from helpers.paths import NOTEBOOKS, PROJECT_ROOT
from helpers.project import load_profile, refused_as_usage_error
from helpers.records import atomic_write_text, has_finished_run, read_json, read_train_log, save_figure, write_json
from helpers.run_guard import changed_parameters

log = logging.getLogger("helpers.batch")  # by name: run as `python -m helpers.batch`, __name__ is __main__

POINT_RECORD = "batch_point.json"  # what the batch knows about a point, kept in the point's run_dir


@dataclass
class BatchResult:
    """What a batch left: one summary row per point, the files written, and which points ran this time."""

    plan: Plan
    rows: list[dict[str, Any]]
    markdown: str
    summary_csv: Path
    summary_md: Path
    chart: Path
    ran: list[str] = field(default_factory=list)


def notebook_done(point: Point, notebook: str) -> bool:
    """Training is done when run.json says finished; another notebook when the batch recorded it finished."""
    if notebook == TRAIN:
        return has_finished_run(point.run_dir)
    done = _point_record(point).get("notebooks", {}).get(notebook, {}).get("status") == "finished"
    return done and (point.run_dir / f"{notebook}.ipynb").exists()


def point_status(point: Point, notebooks: tuple[str, ...]) -> str:
    """finished, failed, interrupted (started, not ended) or pending (never started)."""
    if all(notebook_done(point, n) for n in notebooks):
        return "finished"
    status = _point_record(point).get("status")
    if status == "failed":
        return "failed"
    return "interrupted" if status or (point.run_dir / "run.json").exists() else "pending"


def run_point(point: Point, notebooks: tuple[str, ...]) -> str:
    """Run a point's notebooks that are not done yet; a failure is recorded with its error and returned."""
    record = {**_point_record(point), "name": point.name, "values": point.values, "status": "running", "error": None,
              "host": socket.gethostname(), "pid": os.getpid()}
    record.setdefault("notebooks", {})
    for notebook in notebooks:
        if notebook_done(point, notebook):
            continue
        record["notebooks"][notebook] = {"status": "running"}
        write_json(point.run_dir / POINT_RECORD, record)
        started = time.perf_counter()
        try:
            run_notebook(notebook, point.params, point.run_dir, progress_bar=False)
        except Exception as error:  # any failure of one point is recorded; the batch goes on
            message = (f"{notebook}: {error.ename}: {error.evalue}" if hasattr(error, "ename")
                       else f"{notebook}: {type(error).__name__}: {error}")
            record["notebooks"][notebook] = {"status": "failed", "seconds": round(time.perf_counter() - started, 1)}
            write_json(point.run_dir / POINT_RECORD, {**record, "status": "failed", "error": message})
            log.warning("point %s failed: %s (executed notebook: %s)", point.name, message,
                        point.run_dir / f"{notebook}.ipynb")
            return "failed"
        record["notebooks"][notebook] = {"status": "finished", "seconds": round(time.perf_counter() - started, 1)}
    write_json(point.run_dir / POINT_RECORD, {**record, "status": "finished"})
    return "finished"


def run_batch(plan: Plan | str | Path, retry_failed: bool = True, out_root: str | Path | None = None,
              workers: int | str | None = None, address: str | None = None) -> BatchResult:
    """Run every point not finished yet (failed ones too unless retry_failed=False), then write the summary.
    workers (default: the plan's) above 1 runs that many points at once through Ray; so does 'auto' with several
    GPUs here, or an address (or RAY_ADDRESS) of a Ray cluster, where 'auto' means one point per GPU there."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan, out_root)
    workers = plan.workers if workers in (None, "") else check_workers(workers)
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_notebooks(plan.notebooks)
    mount_drive_if_needed(str(plan.out_dir))
    check_recorded_parameters(plan)
    statuses = [point_status(p, plan.notebooks) for p in plan.points]
    todo = [p for p, status in zip(plan.points, statuses)
            if status != "finished" and (retry_failed or status != "failed")]
    parallel = bool(todo) and use_ray(workers, address)
    log.info("batch %s: %d points; %d to run, %d finished%s; %s", plan.name, len(plan.points), len(todo),
             statuses.count("finished"), "" if retry_failed else " (failed points left as they are)",
             f"through Ray, workers {workers}" if parallel else "one at a time")
    if parallel:
        import_ray()  # not installed: say so before anything runs
    use_offline_hub_when_local([p.config for p in plan.points])
    _prepare_models(plan, todo)
    progress = BatchProgress(plan.name, len(todo))
    try:
        if parallel:
            run_points(todo, run_point, (plan.notebooks,), workers, address, plan.out_dir, progress, record_crash)
        else:
            for point in todo:
                progress.started(point)
                progress.ended(point, run_point(point, plan.notebooks))
    finally:
        progress.close()
        result = write_summary(plan)
        result.ran = progress.ran
    return result


class BatchProgress:
    """Points done, running and failed: a bar (a widget in a notebook) and a log line as each point ends."""

    def __init__(self, name: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"batch {name}", unit="point", disable=not total)
        self.total, self.failed, self.started_at = total, 0, time.perf_counter()
        self.ran: list[str] = []
        self.running: list[str] = []

    def started(self, point: Point) -> None:
        self.ran.append(point.name)
        self.running.append(point.name)
        self._show()

    def ended(self, point: Point, status: str) -> None:
        self.running.remove(point.name)
        self.failed += status == "failed"
        self.bar.update(1)
        self._show()
        log.info("[%d/%d] %s %s; %d running, %d waiting, %.0f s elapsed", self.bar.n, self.total, point.name, status,
                 len(self.running), self.total - len(self.ran), time.perf_counter() - self.started_at)

    def close(self) -> None:
        self.bar.close()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"running {', '.join(self.running) or 'none'}"
                                 + (f"; {self.failed} failed" if self.failed else ""))


def record_crash(point: Point, reason: str) -> str:
    """Record a point whose run ended outside its notebooks (its worker died) as failed, with the reason."""
    write_json(point.run_dir / POINT_RECORD, {**_point_record(point), "name": point.name, "values": point.values,
                                               "status": "failed", "error": reason})
    log.warning("point %s failed: %s", point.name, reason)
    return "failed"


def check_recorded_parameters(plan: Plan) -> None:
    """Refuse, before anything runs, a point whose run_dir holds a run made with other parameters that change the
    training (helpers.run_guard's rule, for the values the plan passes to the training notebook; a plan edited
    since): its results would be reported, or resumed, as this point's."""
    passed = notebook_parameter_names(NOTEBOOKS / f"{TRAIN}.ipynb")
    for point in plan.points:
        path = point.run_dir / "run.json"
        recorded = read_json(path).get("parameters", {}) if path.exists() else {}
        wanted = {k: v for k, v in point.config.to_dict().items() if k in passed and k in point.params}
        changed = {name: (old, new) for name, old, new in changed_parameters(recorded, wanted)}
        if changed:
            differences = ", ".join(f"{k} {old!r} there, {new!r} in the plan" for k, (old, new) in changed.items())
            raise ValueError(f"point {point.name!r}: {_shown(point.run_dir)} holds a run made with other parameters "
                             f"({differences}); give the plan another name (name: ...) or remove that run_dir")


def _prepare_models(plan: Plan, todo: list[Point]) -> None:
    """Build the offline tiny model once, through the setup notebook, when points to run need it and it is missing."""
    tiny = PROJECT_ROOT / TINY_MODEL_DIR
    needed = any(Path(p.config.model_name) == Path(TINY_MODEL_DIR) for p in todo)
    if needed and not (tiny / "config.json").exists():
        log.info("building the offline tiny model with 00_setup (once for the batch)")
        try:
            params = {**load_profile(plan.profile), "model_name": TINY_MODEL_DIR}
            run_notebook("00_setup", params, plan.out_dir / "_setup")
        except Exception as error:  # the points will each say what is missing
            log.warning("00_setup failed (%s); see %s", getattr(error, "evalue", error), plan.out_dir / "_setup")


# --- the comparison -------------------------------------------------------------------------------------------

def summary_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per point: the values that vary, status, losses, eval figures when present, speed and memory."""
    rows = []
    for point in plan.points:
        record = read_json(point.run_dir / "run.json") if (point.run_dir / "run.json").exists() else {}
        metrics = record.get("metrics") or {}
        log_rows = _train_log(point)
        losses = [r["loss"] for r in log_rows if r.get("loss") is not None]
        evaluation = (read_json(point.run_dir / "eval.json").get("tuned") or {}
                      if (point.run_dir / "eval.json").exists() else {})
        held_out = [r["eval_loss"] for r in log_rows if r.get("eval_loss") is not None]
        status = point_status(point, plan.notebooks)
        rows.append({
            "point": point.name,
            **{key: _cell(getattr(point.config, key, None)) for key in plan.varied},
            "status": status,
            "final_loss": _round(metrics.get("final_loss", losses[-1] if losses else None), 4),
            "best_loss": _round(min(losses) if losses else None, 4),
            "eval_loss": _round(metrics.get("final_eval_loss", held_out[-1] if held_out else None), 4),
            "tuned_loss": _round(evaluation.get("loss"), 4),
            "tuned_preference_accuracy": _round(evaluation.get("preference_accuracy"), 3),
            "runtime_s": _round(metrics.get("train_runtime_s"), 1),
            "tokens_per_s": _round(metrics.get("tokens_per_s"), 1),
            "peak_gpu_gib": _round(metrics.get("peak_gpu_reserved_gib"), 2),
            "peak_rss_gib": _round(metrics.get("peak_rss_gib"), 2),
            "run_dir": point.params["run_dir"],
            "error": _point_record(point).get("error") if status == "failed" else None,
        })
    return rows


OPTIONAL_COLUMNS = ("eval_loss", "tuned_loss", "tuned_preference_accuracy", "peak_gpu_gib", "error")
# What "best" means, in order of preference: evaluate's held-out loss, the last held-out loss during training,
# the last training loss.
RANKED_BY = {"tuned_loss": "held-out loss after training (03_evaluate)", "eval_loss": "held-out loss at the end of "
             "training", "final_loss": "final training loss"}


def summary_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column, less the optional ones no point has (eval figures, GPU memory, errors)."""
    return [c for c in rows[0] if c not in OPTIONAL_COLUMNS or any(r[c] is not None for r in rows)] if rows else []


def summary_markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    """The comparison as Markdown: counts, the best point, a table, and each failure's error."""
    columns = [c for c in summary_columns(rows) if c not in ("run_dir", "error")]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "interrupted", "pending")}
    by = next(c for c in RANKED_BY if c == "final_loss" or any(r[c] is not None for r in rows))
    scored = [r for r in rows if r["status"] == "finished" and r[by] is not None]
    lines = [f"## Batch {plan.name}", "",
             f"Plan `{_shown(plan.path)}`, profile `{plan.profile}`, notebooks {', '.join(plan.notebooks)}; "
             f"{len(rows)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", ""]
    if scored:
        best = min(scored, key=lambda r: r[by])
        lines += [f"Lowest {RANKED_BY[by]} (`{by}`): **{best['point']}** ({best[by]}).", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "Failed points (the executed notebook in the run_dir shows the traceback):", ""]
        lines += [f"- **{r['point']}** ({r['run_dir']}): {str(r['error']).splitlines()[0][:300]}" for r in failures]
    return "\n".join(lines) + "\n"


def write_summary(plan: Plan) -> BatchResult:
    """Write summary.csv, summary.md and loss_curves.png into the batch folder (atomically)."""
    rows = summary_rows(plan)
    columns = summary_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    summary_csv = atomic_write_text(plan.out_dir / "summary.csv", buffer.getvalue())
    chart = plot_loss_curves(plan, plan.out_dir / "loss_curves.png")
    markdown = summary_markdown(plan, rows)
    summary_md = atomic_write_text(plan.out_dir / "summary.md",
                                   markdown + "\n![Training loss of every point](loss_curves.png)\n")
    return BatchResult(plan, rows, markdown, summary_csv, summary_md, chart)


def plot_loss_curves(plan: Plan, path: Path) -> Path:
    """Every point's training loss on one chart (faint raw, solid moving average; eval loss as dots if logged)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    smoothed = held_out = False
    for point in plan.points:
        rows = _train_log(point)
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        if not train:
            continue
        steps, losses = zip(*train)
        window = len(losses) // 10 if len(losses) >= 20 else 1  # noisy steps: draw a moving average over them
        (line,) = ax.plot(steps, moving_average(losses, before=window - 1), linewidth=1.8, label=point.name)
        if window > 1:
            ax.plot(steps, losses, linewidth=0.8, alpha=0.3, color=line.get_color())
            smoothed = True
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if evals:
            ax.plot(*zip(*evals), "o--", markersize=4, color=line.get_color())
            held_out = True
    handles, labels = ax.get_legend_handles_labels()
    if held_out:
        handles.append(Line2D([], [], linestyle="--", marker="o", markersize=4, color="gray"))
        labels.append("held-out loss (same colour)")
    if handles:
        ax.legend(handles, labels, fontsize="small", ncol=2 if len(plan.points) > 8 else 1)
    else:
        ax.text(0.5, 0.5, "no point has a training log yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="loss", title=f"Training loss, batch {plan.name} ({len(plan.points)} points"
                                               + (", moving average over a tenth of the steps)" if smoothed else ")"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plan_markdown(plan: Plan) -> str:
    """The plan before it runs: its points, their values and where each stands now."""
    lines = [f"**{plan.name}**: profile `{plan.profile}`, {len(plan.points)} points, notebooks "
             f"{', '.join(plan.notebooks)}, into `{_shown(plan.out_dir)}`", "",
             "| point | " + " | ".join(plan.varied) + " | now |", "|" + "---|" * (len(plan.varied) + 2)]
    lines += [f"| {p.name} | " + " | ".join(str(_cell(getattr(p.config, k, None))) for k in plan.varied)
              + f" | {point_status(p, plan.notebooks)} |" for p in plan.points]
    return "\n".join(lines) + "\n"


def _train_log(point: Point) -> list[dict[str, Any]]:
    path = point.run_dir / "train_log.csv"
    return read_train_log(path) if path.exists() else []


def _point_record(point: Point) -> dict[str, Any]:
    path = point.run_dir / POINT_RECORD
    return read_json(path) if path.exists() else {}


def _cell(value: Any) -> Any:
    return "+".join(map(str, value)) if isinstance(value, list) else value


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _shown(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def main(argv: list[str] | None = None) -> BatchResult:
    from tqdm.contrib.logging import logging_redirect_tqdm

    parser = argparse.ArgumentParser(prog="python -m helpers.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", nargs="?", default=RunConfig.batch_plan,
                        help=f"a plan file or a name in notebooks/plans (default: {RunConfig.batch_plan})")
    parser.add_argument("--output-dir", help="folder for outputs/<batch>/ (default: the plan's output_dir, or outputs)")
    parser.add_argument("--skip-failed", action="store_true", help="leave points that failed before; run only new or "
                        "interrupted ones")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; rewrite the summary and chart")
    parser.add_argument("--workers", type=_workers_argument, help="points at once: a number, or auto (one per GPU; "
                        "one at a time with one GPU or none); default: the plan's workers, else auto")
    parser.add_argument("--address", help="a Ray cluster to run the points on, host:port (default: RAY_ADDRESS if "
                        "set, else this machine)")
    args = parser.parse_args(argv)
    package_log = logging.getLogger("helpers")
    if not package_log.handlers:  # the point-by-point record on the terminal, timestamped
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    with refused_as_usage_error(parser):
        plan = load_plan(args.plan, args.output_dir)
    started = time.perf_counter()
    with logging_redirect_tqdm(loggers=[logging.getLogger("helpers")]):
        result = (write_summary(plan) if args.summary_only else
                  run_batch(plan, retry_failed=not args.skip_failed, workers=args.workers, address=args.address))
    print(f"\n{result.markdown}")
    print(f"Ran {len(result.ran)} point(s){': ' + ', '.join(result.ran) if result.ran else ''} in "
          f"{time.perf_counter() - started:.0f} s. Summary: "
          f"{_shown(result.summary_md)}, {_shown(result.summary_csv)}; chart: {_shown(result.chart)}")
    return result


def _workers_argument(text: str) -> int | str:
    try:
        return check_workers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


if __name__ == "__main__":
    main()
