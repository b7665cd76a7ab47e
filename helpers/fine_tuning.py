"""One run in this process, SFT or DPO, top to bottom: guard the run, then rows, model, trainer, and the record
(train_log.csv, the adapter, run.json's metrics); resumed from the newest complete checkpoint, with advice after
an out-of-memory error.

The global batch is what the config asks for on one process (per_device_train_batch_size x
gradient_accumulation_steps); with N processes (SFT under `accelerate launch`) the accumulation is divided by N so
that it stays the same. Each process then computes its rows per step as micro_batching asks (helpers.micro_batching): in
the recipe's micro-batches, or in fewer, larger ones where memory allows. run.json's `distributed` records what
ran. Only the main process writes run.json, split.json, the log and the adapter.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import helpers.stack  # noqa: F401  (unsloth before transformers, trl, peft)
from helpers import data, micro_batching, modeling, preference, trainers
from helpers.config import RunConfig
from helpers.environment import (
    cap_gpu_memory,
    device_report,
    environment_report,
    mount_drive_if_needed,
    peak_memory,
    reset_peak_memory,
    resolve_precision,
)
from helpers.modeling import check_model_source
from helpers.monitoring import StepClock, TrainingStages
from helpers.records import (
    PREFERENCE_COLUMNS,
    checkpoint_tokens,
    latest_checkpoint,
    staged_folder,
    training_log,
    update_run_record,
    write_train_log,
)
from helpers.run_guard import check_run_dir, complete_overwrite, training_folder
from helpers.timing import Stages, record_stages

log = logging.getLogger(__name__)


def run_training(config: RunConfig, rows: list[dict[str, Any]] | None = None,
                 dpo: bool = False) -> dict[str, Any] | None:
    """SFT (or DPO, with dpo) in this process (one of N under accelerate), top to bottom: guard the run, then rows,
    model, trainer, record, each stage timed (run.json's `stages`). `rows` are the checked dataset rows when the
    caller has them already (else they are loaded and checked first, before anything is written). Returns the
    metrics on the main process, None on the others."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    stages = Stages()
    per_device, accumulation = split_global_batch(config.per_device_train_batch_size,
                                                  config.gradient_accumulation_steps, state.num_processes)
    rows = data.load_checked_rows(config, preference=dpo) if rows is None else rows
    stages.add("data checked", getattr(rows, "seconds", 0.0))
    # Guard the run, and hold rows out; the main process checks run_dir and writes run.json and split.json first.
    with state.main_process_first():
        precision = prepare_run(config, main_process=state.is_main_process, rows=rows)
        # From here the run writes in its training folder: run_dir, or beside it while it replaces a finished run.
        run_dir, config = config.run_dir, dataclasses.replace(config, run_dir=str(training_folder(config)))
        with stages.stage("data formatted"):
            if dpo and config.sft_run_dir:  # as the SFT run split them: its held-out rows stay unseen
                train_rows, _, eval_rows = data.reuse_split(rows, config, config.sft_run_dir)
            else:
                train_rows, _, eval_rows = data.hold_out(rows, config, write=state.is_main_process)
    # Rows, formatted as the trainer takes them (the held-out subset scored while training; 03_evaluate scores all).
    with stages.stage("data formatted"):
        tokenizer = modeling.load_tokenizer(config)
        if dpo:
            train_set, longest = data.to_preference_set(train_rows, config, tokenizer), None
        else:
            train_set, longest = data.training_set(train_rows, config, tokenizer)
        to_dataset = data.to_preference_set if dpo else data.to_training_set
        eval_set = to_dataset(eval_rows, config, tokenizer) if eval_rows else None
    # Model: DPO's policy, or the base model with a fresh adapter, the step's rows computed as micro_batching asks
    # (decided before LoRA is added: the gradient checkpointing mode goes with it).
    with stages.stage("model loaded"):
        if dpo:
            model, tokenizer = preference.load_policy(config, precision)
            computed = micro_batching.MicroBatching(per_device, accumulation)
        else:
            model, tokenizer = modeling.load_base_model(config, precision)
            computed = micro_batching.decide(config, per_device, accumulation, model, longest)
    if not dpo:
        with stages.stage("LoRA added"):
            model = modeling.add_lora(model, config, computed.gradient_checkpointing)
    # Trainer (trl tokenizes the rows here).
    with stages.stage("trainer built"):
        run_config = dataclasses.replace(config, per_device_train_batch_size=computed.rows,
                                         gradient_accumulation_steps=computed.accumulation)
        build_trainer = preference.build_trainer if dpo else trainers.build_trainer
        trainer = build_trainer(model, tokenizer, train_set, run_config, precision, eval_set)
    if dpo:
        update_run_record(config.run_dir, stage="dpo", reference=preference.reference_in_use(trainer))
    # Train and record.
    with micro_batching.training(computed, model, config) as kept:
        metrics = train_and_record(trainer, model, tokenizer, config, stages)
    peaks = gather_object([peak_memory()])  # every process's own peaks (each its own GPU), collected on all
    if metrics is not None and not dpo:
        update_run_record(config.run_dir, distributed={
            "num_processes": state.num_processes, "micro_batching": config.micro_batching, **computed.record(),
            **({"layers_kept_per_micro_batch": kept.record()} if kept else {}),
            "global_batch": computed.rows * computed.accumulation * state.num_processes,
            "peak_memory_per_process": peaks})
    if metrics is not None:
        complete_overwrite(run_dir)  # a finished overwrite takes the finished run's place, in one rename
    return metrics


def split_global_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """(per-device batch, accumulation) on `processes` processes keeping the one-process global batch."""
    global_batch = per_device * accumulation
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if global_batch % (per_device * processes):
        raise ValueError(f"the global batch {global_batch} (per_device_train_batch_size {per_device} x "
                         f"gradient_accumulation_steps {accumulation}) does not split evenly over {processes} "
                         f"processes; choose an accumulation divisible by {processes}")
    return per_device, global_batch // (per_device * processes)


def prepare_run(config, main_process: bool = True, rows: list[dict[str, Any]] | None = None) -> str:
    """Everything checked and recorded before a model loads; returns the precision to train in.

    Refuses a missing local model or an unreachable offline Hub id; caps GPU memory if asked. The main process
    also mounts Drive on Colab when needed, checks run_dir (helpers.run_guard: a finished run unless overwrite, an
    interrupted one with other parameters or, given the checked `rows`, other rows) and writes run.json with
    status 'running' where the run trains.
    """
    check_model_source(config.model_name)
    precision = resolve_precision(config.precision)
    cap_gpu_memory(config.max_gpu_memory_gib)
    if not main_process:
        return precision
    mount_drive_if_needed(config.run_dir)  # first: a finished run on Drive is visible only once Drive is mounted
    content = {"rows": len(rows), "sha256": data.rows_digest(rows)} if rows is not None else None
    folder = check_run_dir(config, content)
    folder.mkdir(parents=True, exist_ok=True)
    update_run_record(folder, parameters=config.to_dict(), data=content, precision=precision,
                      environment=environment_report(), status="running", metrics={})
    return precision


def train_and_record(trainer, model, tokenizer, config, stages: Stages | None = None) -> dict[str, Any] | None:
    """Train, save the adapter and tokenizer, write train_log.csv and the run's metrics; return the metrics.
    `stages` (the run's stages so far) gets training's and the save's, and all of them go into run.json.
    In a multi-process run only the main process writes (and gets the metrics); the others return None."""
    import torch

    run_dir = Path(config.run_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints", remove_incomplete=True) if config.resume == "auto" else None
    tokens_before = checkpoint_tokens(checkpoint)  # read now: rotation may delete the checkpoint while training
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    reset_peak_memory()
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as error:
        if trainer.is_world_process_zero():
            update_run_record(run_dir, status="failed", error="out of memory")
        raise RuntimeError(out_of_memory_advice(config)) from error
    except Exception as error:
        if trainer.is_world_process_zero():
            update_run_record(run_dir, status="failed", error=str(error))
        raise
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None
    stages = stages or Stages()
    for name, value in _callback(trainer, TrainingStages).split(seconds).items():
        stages.add(name, value)
    with stages.stage("adapter saved"):
        rows = training_log(trainer.state.log_history)
        write_train_log(run_dir / "train_log.csv", rows)
        save_adapter(model, tokenizer, run_dir / "adapter")
    tokens = int(trainer.state.num_input_tokens_seen) - tokens_before  # trained in this session
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    eval_losses = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
    tenth = max(1, len(losses) // 10)
    metrics = {
        "train_runtime_s": round(seconds, 2),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "trained_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "train_loss": round(output.training_loss, 5),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "first_tenth_mean_loss": round(sum(losses[:tenth]) / tenth, 5) if losses else None,
        "last_tenth_mean_loss": round(sum(losses[-tenth:]) / tenth, 5) if losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_rows": len(trainer.train_dataset),
        "training_eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else None,
        **_last_logged(rows, PREFERENCE_COLUMNS),
        **_callback(trainer, StepClock).steady_speed(),
        **peak_memory(),
    }
    record_stages(run_dir, stages.rounded())
    update_run_record(run_dir, status="finished", metrics=metrics, accelerator=device_report())
    log.info("training finished: %s", metrics)
    return metrics


def _callback(trainer, kind: type):
    """The trainer's callback of that kind (every run has one of each watcher)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


def _last_logged(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> dict[str, float]:
    """{'final_rewards_accuracies': ..., ...}: the last logged value of each of the columns the log has."""
    last = {}
    for column in columns:
        values = [r[column] for r in rows if r.get(column) is not None]
        if values:
            last["final_" + column.replace("/", "_")] = values[-1]
    return last


def save_adapter(model, tokenizer, adapter_dir: Path) -> Path:
    """Save the trained LoRA adapter ('default'; not a frozen reference copy DPO may hold) and the tokenizer into
    adapter_dir through a temporary folder swapped in at the end."""
    with staged_folder(adapter_dir) as folder:
        model.save_pretrained(folder, selected_adapters=["default"])
        tokenizer.save_pretrained(folder)
    return adapter_dir


def out_of_memory_advice(config) -> str:
    """What to lower after a CUDA out-of-memory error, with the current values."""
    return (f"CUDA ran out of memory. Set micro_batching='recipe' (now {config.micro_batching!r}) to compute each "
            "step in the recipe's smaller micro-batches, or "
            f"lower per_device_train_batch_size (now {config.per_device_train_batch_size}) "
            f"and raise gradient_accumulation_steps (now {config.gradient_accumulation_steps}) to keep the batch, "
            f"or lower max_seq_length (now {config.max_seq_length}) or lora_r (now {config.lora_r}); keep "
            f"load_in_4bit=True (now {config.load_in_4bit}). Checkpoints so far are kept; resume='auto' continues.")
