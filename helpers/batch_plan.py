"""Batch plans: a base profile, fixed overrides, a grid (lists are crossed) and extra points, expanded into points
each with its own run_dir named from its values, every point validated before anything runs; and how many points
run at once (workers)."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from helpers.config import RunConfig, points_at_once
from helpers.data import is_local_path
from helpers.paths import NOTEBOOKS, PLANS, PROJECT_ROOT
from helpers.project import load_profile

PLAN_KEYS = ("name", "profile", "notebooks", "fixed", "grid", "points", "output_dir", "workers")
TRAIN = "01_train_lora"
# Short names for run_dir names; other parameters keep their own name.
SHORT_NAMES = {"learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "max_steps": "steps", "num_train_epochs": "epochs", "per_device_train_batch_size": "bs",
               "gradient_accumulation_steps": "accum", "warmup_steps": "warmup", "weight_decay": "wd",
               "lr_scheduler_type": "sched", "max_seq_length": "len", "dataset": "data", "model_name": "model",
               "target_modules": "modules"}


@dataclass(frozen=True)
class Point:
    """One run of a batch: the values it sets and every parameter its notebooks get."""

    name: str
    values: dict[str, Any]
    params: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return PROJECT_ROOT / self.params["run_dir"]

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.params)


@dataclass(frozen=True)
class Plan:
    """A validated batch plan, expanded into its points."""

    name: str
    path: Path
    profile: str
    notebooks: tuple[str, ...]
    out_dir: Path
    varied: tuple[str, ...]
    points: tuple[Point, ...]
    workers: int | str = "auto"


def plan_path(plan: str | Path) -> Path:
    """The plan file: a path (from here or the project root) or a name in notebooks/plans."""
    for path in (Path(plan), PROJECT_ROOT / plan, PLANS / f"{plan}.yaml"):
        if path.is_file():
            return path.resolve()
    shipped = ", ".join(sorted(p.stem for p in PLANS.glob("*.yaml")))
    raise FileNotFoundError(f"batch plan {str(plan)!r} does not exist; shipped plans: {shipped}")


def load_plan(plan: str | Path, out_root: str | Path | None = None) -> Plan:
    """Read a plan and validate every point before anything runs; errors name the point and the parameter."""
    path = plan_path(plan)
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a plan is a mapping with keys {', '.join(PLAN_KEYS)}")
    unknown = sorted(set(spec) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown plan key(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(PLAN_KEYS)}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    if "profile" not in spec:
        raise ValueError(f"{path}: the plan names no base profile (profile: cpu_tiny, for example)")
    base = {**load_profile(spec["profile"]), **_mapping(spec.get("fixed"), "fixed", path)}
    try:
        RunConfig.from_dict(base)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: fixed: {error}") from None
    notebooks = spec.get("notebooks", [TRAIN])
    if (not isinstance(notebooks, list) or not notebooks or len(set(notebooks)) != len(notebooks)
            or not all(isinstance(n, str) for n in notebooks)):
        raise ValueError(f"{path}: notebooks must be a list of distinct notebook names, e.g. [{TRAIN}], "
                         f"got {notebooks!r}")
    root = Path(out_root or spec.get("output_dir") or "outputs")
    out_dir = (root if root.is_absolute() else PROJECT_ROOT / root) / name
    combos = expand(_mapping(spec.get("grid"), "grid", path), spec.get("points") or [], path)
    varied = tuple(dict.fromkeys(key for combo in combos for key in combo))
    points = _named_points(combos, base, out_dir, path)
    try:
        workers = check_workers(spec.get("workers", "auto"))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return Plan(name, path, spec["profile"], tuple(notebooks), out_dir, varied, tuple(points), workers)


def check_workers(workers: Any) -> int | str:
    """How many points run at once: a positive number (digits in a string too), or 'auto' (one per GPU; one at a
    time with one GPU or none); a ValueError naming what is accepted otherwise."""
    checked = points_at_once(workers)
    if checked is not None:
        return checked
    raise ValueError(f"workers {workers!r} is invalid; it must be a positive number of points run at once, or "
                     "'auto' (one point per GPU; one at a time with one GPU or none)")


def expand(grid: dict[str, Any], extra: list[dict[str, Any]], source: Path | str = "plan") -> list[dict[str, Any]]:
    """The grid crossed (first key slowest), then the extra points; each a dict of the values it sets."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: grid {key!r} must be a non-empty list of values (a single value goes under "
                             f"fixed), got {values!r}")
    if not isinstance(extra, list) or not all(isinstance(p, dict) and p for p in extra):
        raise ValueError(f"{source}: points must be a list of non-empty mappings of parameter: value")
    crossed = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    return crossed + [dict(p) for p in extra] or [{}]


def point_name(values: dict[str, Any]) -> str:
    """A folder name from a point's values, e.g. {'learning_rate': 0.005, 'lora_r': 8} -> 'lr0.005_r8'."""
    parts = []
    for key, value in values.items():
        short = SHORT_NAMES.get(key, key)
        if isinstance(value, str) and key in ("dataset", "model_name"):
            value = Path(value).stem if is_local_path(value) else value.rstrip("/").rsplit("/", 1)[-1]
        text = ("+".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float)
                else str(value))
        text = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "none"
        parts.append(f"{short}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool)
                     else f"{short}-{text}")
    return "_".join(parts)[:120] or "base"


def _named_points(combos: list[dict[str, Any]], base: dict[str, Any], out_dir: Path, source: Path) -> list[Point]:
    names = [point_name(values) for values in combos]
    points, seen = [], {}
    for values, name in zip(combos, names):
        if "run_dir" in values:
            raise ValueError(f"{source}: point {name!r} sets run_dir; the batch names each point's run_dir itself")
        if names.count(name) > 1:  # two different values that read the same: tell them apart
            name += "-" + hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]
        if name in seen:
            raise ValueError(f"{source}: point {name!r} appears twice with the same values {values}")
        run_dir = out_dir / name
        params = {**base, **values, "run_dir": str(run_dir.relative_to(PROJECT_ROOT)
                                                    if run_dir.is_relative_to(PROJECT_ROOT) else run_dir)}
        try:
            checked = RunConfig.from_dict(params).to_dict()  # ints widened to floats where floats are expected
            params = {k: checked[k] for k in params}
        except (ValueError, TypeError) as error:
            raise ValueError(f"{source}: point {name!r} {values}: {error}") from None
        seen[name] = values
        points.append(Point(name, values, params))
    return points


def _mapping(value: Any, key: str, source: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {key} must be a mapping of parameter: value, got {value!r}")
    if key == "fixed" and "run_dir" in value:
        raise ValueError(f"{source}: fixed sets run_dir; the batch names each point's run_dir itself")
    return value


def check_notebooks(names: tuple[str, ...]) -> None:
    """Every notebook a plan names must be in notebooks/ (the batch notebook itself excepted)."""
    available = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb") if p.stem != "05_batch")
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"notebook(s) {', '.join(map(repr, missing))} not in {NOTEBOOKS}; choose from: "
                         f"{', '.join(available)}")
