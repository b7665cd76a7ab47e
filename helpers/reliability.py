"""Runs that survive: finished runs not overwritten by accident, resume from the newest complete checkpoint,
a stop with advice on a non-finite loss or out-of-memory error, and guards on the model source."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import helpers.stack  # noqa: F401  (unsloth before transformers)
from transformers import TrainerCallback

log = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written by the Trainer for every checkpoint; trainer_state.json comes last, so its presence marks completion.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
RUN_FILES = ("adapter", "checkpoints", "train_log.csv", "loss.png", "run.json", "split.json", "generations.jsonl",
             "eval.json", "eval.md", "eval.png", "export")


class RunExistsError(RuntimeError):
    """run_dir already holds a finished run."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# Where an overwrite=True rerun keeps the finished run it replaces until the new one has finished. Files move one
# by one only into REPLACING (setting aside) or out of RESTORING (putting back), each then renamed in one step, so
# that a kill at any point leaves the old run whole in place, whole in REPLACED, or split in a way the next call
# completes.
REPLACING, REPLACED, RESTORING = ".replacing", ".replaced", ".restoring"


def check_run_dir(config) -> None:
    """Refuse a run_dir holding a finished run unless overwrite=True; before anything loads. With overwrite the
    finished run is set aside (run_dir/.replaced) until the new one finishes; a run set aside by an overwrite that
    did not finish (killed, failed) is first put back."""
    run_dir = Path(config.run_dir)
    restore_replaced_run(run_dir)
    record = run_dir / "run.json"
    finished = record.exists() and json.loads(record.read_text()).get("status") == "finished"
    if finished and not config.overwrite:
        raise RunExistsError(f"run_dir {str(run_dir)!r} holds a finished run; choose another run_dir, "
                             "or set overwrite=True to replace it")
    if finished:
        (run_dir / REPLACING).mkdir()
        for name in RUN_FILES:
            if (run_dir / name).exists():
                (run_dir / name).rename(run_dir / REPLACING / name)
        (run_dir / REPLACING).rename(run_dir / REPLACED)
        log.info("the finished run in %s is set aside in %s until the new run finishes", run_dir, REPLACED)
    elif config.resume == "never":
        _remove_run_files(run_dir)


def restore_replaced_run(run_dir: str | Path) -> bool:
    """Put back a finished run that an unfinished overwrite set aside (the unfinished run's files are removed);
    drop it once the new run has finished. True when one was put back."""
    run_dir = Path(run_dir)
    record = run_dir / "run.json"
    if (run_dir / REPLACING).is_dir():  # killed while setting aside: the new run had not started
        _move_back(run_dir / REPLACING)
    if (run_dir / RESTORING).is_dir():  # killed while putting back: the new run's files are gone already
        _move_back(run_dir / RESTORING)
        return True
    if not (run_dir / REPLACED).is_dir():
        return False
    if record.exists() and json.loads(record.read_text()).get("status") == "finished":
        shutil.rmtree(run_dir / REPLACED)
        return False
    _remove_run_files(run_dir)
    (run_dir / REPLACED).rename(run_dir / RESTORING)
    _move_back(run_dir / RESTORING)
    log.warning("the overwrite of %s did not finish; the finished run it was replacing is back", run_dir)
    return True


def _move_back(aside: Path) -> None:
    for path in aside.iterdir():
        path.rename(aside.parent / path.name)
    aside.rmdir()


def discard_replaced_run(run_dir: str | Path) -> None:
    """Once a new run has finished, drop the run it replaced."""
    shutil.rmtree(Path(run_dir) / REPLACED, ignore_errors=True)


def _remove_run_files(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def check_model_source(model_name: str) -> None:
    """A local model path must exist; a Hub id must be cached when the Hub is offline."""
    looks_local = model_name.startswith(("/", "./", "../", "~", "outputs/")) or Path(model_name).exists()
    if looks_local:
        if not Path(model_name).expanduser().is_dir():
            raise FileNotFoundError(f"model_name {model_name!r} is a local path that does not exist "
                                    "(for the offline tiny model, run 00_setup first)")
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_name, "config.json"), str):
            raise RuntimeError(f"model_name {model_name!r} is a Hub id, but the Hub is offline (HF_HUB_OFFLINE) "
                               "and it is not in the local cache; use the offline profile (-f "
                               "notebooks/params/cpu_tiny.yaml) or a local model path")


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


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN or infinite loss, before it is checkpointed, with settings to try."""

    def __init__(self, config):
        self.config = config

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            checkpoint = latest_checkpoint(Path(self.config.run_dir) / "checkpoints")
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"the training loss became {loss} at step {state.global_step}; {kept}. Try a lower learning_rate "
                f"(now {self.config.learning_rate}), more warmup_steps (now {self.config.warmup_steps}), or "
                "precision='bf16' / 'fp32' instead of fp16; then run again (resume='auto' continues from the "
                "last checkpoint)")


def out_of_memory_advice(config) -> str:
    """What to lower after a CUDA out-of-memory error, with the current values."""
    return (f"CUDA ran out of memory. Set micro_batching='recipe' (now {config.micro_batching!r}) to compute each "
            "step in the recipe's smaller micro-batches, or "
            f"lower per_device_train_batch_size (now {config.per_device_train_batch_size}) "
            f"and raise gradient_accumulation_steps (now {config.gradient_accumulation_steps}) to keep the batch, "
            f"or lower max_seq_length (now {config.max_seq_length}) or lora_r (now {config.lora_r}); keep "
            f"load_in_4bit=True (now {config.load_in_4bit}). Checkpoints so far are kept; resume='auto' continues.")
