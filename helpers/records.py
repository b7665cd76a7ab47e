"""What a run leaves behind: run.json, train_log.csv, plots and folders (adapter, exports), each written
atomically (old or new, never torn); which files make a run, and the newest complete checkpoint to resume from.
(What a run_dir may hold when a run starts, resumes or replaces another: helpers.run_guard.)"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "epoch", "eval_loss")
# What DPO logs besides: how often the policy's implicit reward ranks chosen above rejected, and by how much.
PREFERENCE_COLUMNS = ("rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to path through a temporary file in the same folder, renamed over it at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Created as open() creates a file, 0666 less the umask: the usual permissions, without reading the umask
    # (os.umask can only read it by setting it, for every thread of the process).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
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


# --- the run directory: its files, its checkpoints ---------------------------------------------------------

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written by the Trainer for every checkpoint; trainer_state.json comes last, so its presence marks completion.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
# A run's own files and folders: replaced, resumed and removed together (the trackers' too: TensorBoard's events
# and wandb's run folder follow the run they logged). Anything else in a run_dir (executed notebooks, a batch's
# record) is left alone.
RUN_FILES = ("adapter", "checkpoints", "train_log.csv", "loss.png", "run.json", "split.json", "generations.jsonl",
             "eval.json", "eval.md", "eval.png", "export", "tb", "wandb")


def has_finished_run(run_dir: str | Path) -> bool:
    """True when run_dir's run.json says the run finished."""
    record = Path(run_dir) / "run.json"
    return record.exists() and read_json(record).get("status") == "finished"


def remove_run_files(run_dir: str | Path) -> None:
    """Remove a run's own files (RUN_FILES) from run_dir; other files stay."""
    for name in RUN_FILES:
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def is_complete_checkpoint(path: Path) -> bool:
    """True when every file of the checkpoint is there and its trainer state parses and names its own step."""
    match = CHECKPOINT.match(path.name)
    if not match or not all((path / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return state.get("global_step") == int(match.group(1))


def latest_checkpoint(checkpoints_dir: str | Path, remove_incomplete: bool = False) -> Path | None:
    """The newest complete checkpoint. With remove_incomplete (only when about to resume, never while a run may
    be saving), newer incomplete ones, left by a crash while saving, are deleted."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir() if CHECKPOINT.match(p.name)),
                        key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)
    for path in candidates:
        if is_complete_checkpoint(path):
            return path
        if remove_incomplete:
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path)
    return None


def checkpoint_tokens(checkpoint: Path | None) -> int:
    """Input tokens seen up to a checkpoint (0 without one)."""
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))
