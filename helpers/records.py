"""What a run leaves behind: run.json, train_log.csv, plots and folders (adapter, exports), each written
atomically (old or new, never torn)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
LOG_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "epoch", "eval_loss")
# What DPO logs besides: how often the policy's implicit reward ranks chosen above rejected, and by how much.
PREFERENCE_COLUMNS = ("rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to path through a temporary file in the same folder, renamed over it at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A hidden temporary sibling of `final` to write into, renamed to `final` only if the block completes.

    An error removes it; a killed process leaves only the hidden `.<name>.tmp`, removed by the next save there
    (or, killed between the final renames, the old folder as `.<name>.old`, put back by the next save there).
    """
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():  # killed between the two renames below: the old one comes back
        old.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | Path) -> Path:
    """Atomically save a matplotlib figure as PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Atomically write data as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def training_log(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step of a Trainer's log history: training entries, with eval_loss merged in by step;
    DPO's reward columns too when the history has them."""
    columns = LOG_COLUMNS + tuple(c for c in PREFERENCE_COLUMNS if any(c in entry for entry in log_history))
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" in entry or "eval_loss" in entry:
            row = rows.setdefault(entry["step"], {key: None for key in columns} | {"step": entry["step"]})
            row.update({key: entry[key] for key in columns if key in entry and key != "step"})
    return [rows[step] for step in sorted(rows)]


def write_train_log(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Atomically write the training log as CSV: LOG_COLUMNS, then any other columns the rows have."""
    extra = [key for key in dict.fromkeys(k for row in rows for k in row) if key not in LOG_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*LOG_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_train_log(path: str | Path) -> list[dict[str, float]]:
    """The training log as rows of floats (step as int; empty cells as None)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [{key: (int(float(v)) if key == "step" else float(v)) if v not in ("", None) else None
                 for key, v in row.items()} for row in csv.DictReader(handle)]


def update_run_record(run_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """Merge sections into run_dir/run.json (created when missing) and return the whole record."""
    path = Path(run_dir) / "run.json"
    record = read_json(path) if path.exists() else {}
    record.update(sections)
    write_json(path, record)
    return record


def record_runtime_peaks(run_dir: str | Path) -> dict[str, float]:
    """Record in run.json the peak memory of this whole runtime so far (training, inference, evaluation,
    export in one kernel): the larger of what training recorded and what this process has peaked at since the
    last reset. Returns those peaks."""
    from helpers.environment import peak_memory

    record = read_json(Path(run_dir) / "run.json")
    now, trained = peak_memory(), record.get("metrics", {})
    peaks = {name: max(value, trained.get(name, value)) if name.startswith("peak_") else value
             for name, value in now.items()}
    update_run_record(run_dir, runtime_peak_memory=peaks)
    return peaks

