"""What a run_dir may hold when a training run starts there, and how a new run takes a finished one's place.

A finished run is refused unless overwrite=True. An interrupted run is resumed from its newest complete checkpoint
only when the parameters that change what training computes (ALTERS_OPTIMIZATION) are the ones it started with;
otherwise the run stops, naming each changed parameter. With overwrite=True the new run trains in a staging folder
beside run_dir (`.<name>.overwrite`), resumes from its own checkpoints there when killed and run again, and takes
run_dir's place in one rename once it has finished; until then the finished run stays in run_dir, whole and usable,
and afterwards it is dropped. docs/reliability.md has the table of parameters and what a kill leaves at each point.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from helpers.records import RUN_FILES, has_finished_run, latest_checkpoint, read_json, remove_run_files

log = logging.getLogger(__name__)

# Every RunConfig field is in exactly one of these two sets (a test holds them to the dataclass, so a new field
# cannot slip through unclassified). A resume continues the checkpoint's optimizer, scheduler, data order and
# random state, so a parameter that changes the model, the rows, their text, the adapter, the optimizer, the
# schedule, the batch or a seed cannot change under it.
ALTERS_OPTIMIZATION = frozenset({
    "model_name", "max_seq_length", "load_in_4bit", "precision",
    "dataset", "dataset_split", "prompt_field", "response_field", "rejected_field", "prompt_template",
    "system_prompt", "train_on_responses_only", "long_rows", "eval_fraction",  # eval_fraction: which rows train
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_random_state",
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "warmup_steps", "weight_decay", "lr_scheduler_type", "optim", "seed", "packing",
    "num_processes",  # each process's random state is in the checkpoint
    "sft_run_dir", "beta", "loss_type", "reference",  # DPO: the adapter it starts from, its loss and reference
})
# Where files go, how often to log, evaluate and save, how the same step is computed (micro_batching and the
# memory cap only split it otherwise, helpers.micro_batching), and everything after training.
LEAVES_OPTIMIZATION = frozenset({
    "max_gpu_memory_gib", "micro_batching", "logging_steps", "report_to", "run_dir", "save_steps",
    "save_total_limit", "resume", "overwrite", "eval_steps", "training_eval_rows", "max_eval_rows", "prompts",
    "max_new_tokens", "temperature", "formats", "gguf_quantization", "push_to_hub", "hub_repo_id", "private",
    "dry_run", "compare_runs", "batch_plan", "batch_workers", "kit_repo",
})


class RunExistsError(RuntimeError):
    """run_dir already holds a finished run."""


class ResumeRefusedError(ValueError):
    """run_dir holds an interrupted run started with other parameters that change the training."""


def changed_parameters(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, recorded value, wanted value) of each parameter in ALTERS_OPTIMIZATION that differs, in the order
    of `wanted`; a parameter a run did not record (added to the kit since) is not compared."""
    return [(name, recorded[name], value) for name, value in wanted.items()
            if name in ALTERS_OPTIMIZATION and name in recorded and recorded[name] != value]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """'learning_rate 0.0002 -> 0.001, dataset 'a.jsonl' -> 'b.jsonl''."""
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)


def staging_folder(run_dir: str | Path) -> Path:
    """Where an overwrite=True run trains until it takes run_dir's place: `.<name>.overwrite` beside run_dir."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.overwrite")


def _replaced_folder(run_dir: Path) -> Path:
    """Where the replaced run is for the moment between the two renames that swap the folders."""
    return run_dir.with_name(f".{run_dir.name}.replaced")


def training_folder(config) -> Path:
    """Where a run writes while it trains: run_dir, or its staging folder while overwrite=True replaces the
    finished run in it. The same answer on every process of a multi-process run once the main one has checked."""
    run_dir = Path(config.run_dir)
    return staging_folder(run_dir) if config.overwrite and has_finished_run(run_dir) else run_dir


def check_run_dir(config, data: dict[str, Any] | None = None) -> Path:
    """Before anything loads (main process): complete an overwrite that finished, refuse a finished run unless
    overwrite=True, and make ready the folder the run trains in (training_folder), keeping an interrupted run
    there only to resume it unchanged: its parameters, and its rows where `data` ({"rows", "sha256"}, as run.json
    records them) says what they are now. Returns that folder."""
    run_dir = Path(config.run_dir)
    complete_overwrite(run_dir)
    if has_finished_run(run_dir) and not config.overwrite:
        waiting = staging_folder(run_dir)
        pending = (f"; the unfinished overwrite in {str(waiting)!r} resumes with overwrite=True"
                   if (waiting / "run.json").exists() else "")
        raise RunExistsError(f"run_dir {str(run_dir)!r} holds a finished run; choose another run_dir, or set "
                             f"overwrite=True to replace it{pending}")
    folder = training_folder(config)
    _keep_only_a_resumable_run(folder, config, data)
    if folder != run_dir:
        log.info("overwrite=True: the new run trains in %s; the finished run stays in %s, usable, until the new one "
                 "has finished and takes its place", folder, run_dir)
    return folder


def _keep_only_a_resumable_run(folder: Path, config, data: dict[str, Any] | None) -> None:
    """Leave in folder only a run that train_and_record resumes: one with a complete checkpoint, started with the
    same parameters that alter the optimization and on the same rows. resume='never', no checkpoint, or (with
    overwrite=True) a change remove the run's files; a change without overwrite stops the run."""
    record = folder / "run.json"
    if config.resume == "never" or record.exists() and latest_checkpoint(folder / "checkpoints") is None:
        remove_run_files(folder)
        return
    if not record.exists():
        return
    recorded = read_json(record)
    changes = changed_parameters(recorded.get("parameters", {}), config.to_dict())
    before = recorded.get("data")
    if data and before and before.get("sha256") != data["sha256"]:  # the same dataset name, other rows
        changes.append(("dataset content", _rows(before), _rows(data)))
    if not changes:
        return
    if not config.overwrite:
        raise ResumeRefusedError(
            f"run_dir {config.run_dir!r} holds an interrupted run started with other parameters that change the "
            f"training: {describe_changes(changes)}; resuming would continue its optimizer and schedule under the "
            "new values. Set overwrite=True to discard it and start afresh, or choose another run_dir")
    log.warning("overwrite=True: the interrupted run in %s (%s) is discarded; training starts afresh", folder,
                describe_changes(changes))
    remove_run_files(folder)


def _rows(data: dict[str, Any]) -> str:
    return f"{data['rows']} rows, sha256 {data['sha256'][:12]}"


def complete_overwrite(run_dir: str | Path) -> bool:
    """Once the run trained in run_dir's staging folder has finished, it takes run_dir's place, the other files
    of run_dir (executed notebooks, a batch's record) moving with it, and the replaced run is dropped. Also
    completes such a swap that a kill interrupted. Nothing happens otherwise; True when run_dir changed."""
    run_dir = Path(os.path.abspath(run_dir))
    staged, replaced = staging_folder(run_dir), _replaced_folder(run_dir)
    swapped = False
    if has_finished_run(staged):
        if run_dir.exists():  # else killed between the two renames below: only the second is left to do
            for entry in run_dir.iterdir():
                if entry.name not in RUN_FILES and not (staged / entry.name).exists():
                    entry.rename(staged / entry.name)
            shutil.rmtree(replaced, ignore_errors=True)
            run_dir.rename(replaced)
        staged.rename(run_dir)
        swapped = True
        log.info("the new run in %s has finished and replaced the run that was there", run_dir)
    elif replaced.is_dir() and not run_dir.exists():  # the staging folder is gone (removed by hand): put it back
        replaced.rename(run_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    return swapped
