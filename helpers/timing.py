"""Where a run's time goes: wall seconds per named stage (data checked, model loaded, training steps, in-training
evaluation, answers generated, ...), recorded in run.json's `stages` by the notebooks' steps and told as shares."""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from helpers.records import read_json, update_run_record


class Stages:
    """Wall seconds of named stages, in the order they first ran; a stage timed twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as the stage `name` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """Count seconds towards the stage `name`."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """The stages' seconds, rounded to 0.1 s."""
        return {name: round(seconds, 1) for name, seconds in self.seconds.items()}


def record_stages(run_dir: str | Path, seconds: dict[str, float]) -> dict[str, float]:
    """Merge stage seconds into run_dir/run.json's `stages` (a stage run again replaces its earlier time); return
    all the run's stages."""
    path = Path(run_dir) / "run.json"
    stages = {**(read_json(path).get("stages", {}) if path.exists() else {}), **seconds}
    update_run_record(run_dir, stages=stages)
    return stages


def recorded(stage: str) -> Callable:
    """Decorate a notebook step whose `config` argument names the run: its wall time is recorded in the run's
    run.json once it returns, as `stage` formatted with the step's arguments (e.g. "export {export_format}")."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            started = time.perf_counter()
            result = function(*args, **kwargs)
            record_stages(arguments["config"].run_dir,
                          {stage.format(**arguments): round(time.perf_counter() - started, 1)})
            return result

        return timed

    return decorate


def shares(seconds: dict[str, float]) -> list[tuple[str, float, float]]:
    """(stage, seconds, share of the total) for each stage, in order."""
    total = sum(seconds.values()) or 1.0
    return [(name, value, value / total) for name, value in seconds.items()]


def stages_line(seconds: dict[str, float]) -> str:
    """'where the time went: training steps 412 s (61%), model loaded 80 s (12%), ...', largest first."""
    parts = sorted(shares(seconds), key=lambda item: item[1], reverse=True)
    return "where the time went: " + ", ".join(f"{name} {value:.0f} s ({share:.0%})" for name, value, share in parts)


def stages_markdown(run_dir: str | Path) -> str:
    """The run's stages as a table of seconds and shares, in the order they ran."""
    seconds = read_json(Path(run_dir) / "run.json").get("stages", {})
    rows = [f"| {name} | {value:.1f} | {share:.0%} |" for name, value, share in shares(seconds)]
    return "\n".join(["| stage | seconds | share |", "|---|---:|---:|", *rows,
                      f"| **total** | **{sum(seconds.values()):.1f}** | |"])
