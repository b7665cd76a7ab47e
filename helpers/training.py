"""Supervised fine-tuning with trl's SFTTrainer, and what a run records about itself."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import helpers.stack  # noqa: F401  (unsloth before trl)
from helpers.environment import (
    device_report,
    environment_report,
    is_interactive,
    cap_gpu_memory,
    mount_drive_if_needed,
    peak_memory,
    reset_peak_memory,
    resolve_precision,
)
from helpers.modeling import check_model_source
from helpers.monitoring import LiveLossPlot, StepClock, StopOnNonFiniteLoss
from helpers.records import (
    PREFERENCE_COLUMNS,
    check_run_dir,
    checkpoint_tokens,
    discard_replaced_run,
    latest_checkpoint,
    restore_replaced_run,
    staged_folder,
    training_log,
    update_run_record,
    write_train_log,
)

log = logging.getLogger(__name__)


def trainer_arguments(config, precision: str, with_eval: bool = False) -> dict[str, Any]:
    """The recipe's hyperparameters as TrainingArguments keywords, shared by SFT and DPO; precision from the
    hardware; checkpoints in run_dir/checkpoints."""
    return dict(
        output_dir=str(Path(config.run_dir) / "checkpoints"),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        optim=config.optim,
        weight_decay=config.weight_decay,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="steps" if with_eval else "no",
        eval_steps=config.eval_steps,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=config.report_to,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=1,
    )


def sft_config(config, precision: str, with_eval: bool = False):
    """trl's SFTConfig for the run: the shared recipe, the sequence length, packing and where the loss goes."""
    from trl import SFTConfig

    return SFTConfig(**trainer_arguments(config, precision, with_eval), max_length=config.max_seq_length,
                     completion_only_loss=config.train_on_responses_only, packing=config.packing)


def watchers(config) -> list:
    """What watches every run, SFT or DPO: the live loss plot and the loss guard as Trainer callbacks; with
    report_to, the tracker's files placed in run_dir."""
    if config.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(config.run_dir) / "tb")  # transformers 5 reads it here
    if config.report_to == "wandb":
        os.environ.setdefault("WANDB_DIR", str(Path(config.run_dir)))  # WANDB_MODE (e.g. offline) is respected
    return [StopOnNonFiniteLoss(config), LiveLossPlot(is_interactive()), StepClock()]


def build_trainer(model, tokenizer, train_set, config, precision: str, eval_set=None):
    """An SFTTrainer over the formatted rows (`prompt` and `completion` columns), watched by the live plot and
    the loss guard; with an eval_set, the held-out loss is logged every eval_steps."""
    from trl import SFTTrainer

    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_set, eval_dataset=eval_set,
                      args=sft_config(config, precision, with_eval=eval_set is not None), callbacks=watchers(config))


def prepare_run(config, main_process: bool = True) -> str:
    """Everything checked and recorded before a model loads; returns the precision to train in.

    Refuses a missing local model or an unreachable offline Hub id; caps GPU memory if asked. The main process
    also mounts Drive on Colab when needed, refuses a finished run_dir (unless overwrite) and writes run.json
    with status 'running'.
    """
    check_model_source(config.model_name)
    precision = resolve_precision(config.precision)
    cap_gpu_memory(config.max_gpu_memory_gib)
    if not main_process:
        return precision
    mount_drive_if_needed(config.run_dir)  # first: a finished run on Drive is visible only once Drive is mounted
    check_run_dir(config)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    update_run_record(config.run_dir, parameters=config.to_dict(), precision=precision,
                      environment=environment_report(), status="running", metrics={})
    return precision


def train_and_record(trainer, model, tokenizer, config) -> dict[str, Any] | None:
    """Train, save the adapter and tokenizer, write train_log.csv and the run's metrics; return the metrics.
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
            restore_replaced_run(run_dir)  # an overwrite that failed gives the finished run back
        raise RuntimeError(out_of_memory_advice(config)) from error
    except Exception as error:
        if trainer.is_world_process_zero():
            update_run_record(run_dir, status="failed", error=str(error))
            restore_replaced_run(run_dir)
        raise
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None
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
        "eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else None,
        **_last_logged(rows, PREFERENCE_COLUMNS),
        **next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepClock)).steady_speed(),
        **peak_memory(),
    }
    update_run_record(run_dir, status="finished", metrics=metrics, accelerator=device_report())
    discard_replaced_run(run_dir)
    log.info("training finished: %s", metrics)
    return metrics


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


def summary_line(metrics: dict[str, Any]) -> str:
    """One human line about a finished run."""
    gpu = metrics.get("peak_gpu_reserved_gib")
    memory = (f"peak GPU memory {gpu} of {metrics['gpu_total_gib']} GiB reserved" if gpu is not None
              else f"peak RSS {metrics['peak_rss_gib']} GiB")
    return (f"{metrics['steps']} steps in {metrics['train_runtime_s']} s, {metrics['trained_tokens']} tokens "
            f"({metrics['tokens_per_s']} tokens/s), loss {metrics['first_loss']} -> {metrics['final_loss']}, {memory}")

