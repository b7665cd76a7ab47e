"""trl's trainers, watched alike: the recipe's TrainingArguments shared by SFT and DPO, the watchers every run gets,
and SFT's trainer (DPO's is in helpers.preference)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import helpers.stack  # noqa: F401  (unsloth before trl)
from helpers.environment import is_interactive
from helpers.monitoring import LiveLossPlot, StepClock, StopOnNonFiniteLoss, TrainingStages


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
    if config.report_to == "wandb":  # its run folder (run_dir/wandb) goes with the run; WANDB_MODE is respected
        os.environ["WANDB_DIR"] = str(Path(config.run_dir))
    return [StopOnNonFiniteLoss(config), LiveLossPlot(is_interactive()), StepClock(), TrainingStages()]


class TokenWeightedEvalLoss:
    """A Trainer's `eval_loss` as the mean loss of all the label tokens evaluated, whatever the batches. transformers
    alone averages each batch's own mean loss, weighted by rows, so the same model scored in batches of 2 rows (the
    recipe's micro-batches) and of 8 (`micro_batching="auto"`) gave different eval losses (7.218 against 7.313 at
    real scale, docs/real-scale.md). Each batch's mean is multiplied back by its label tokens (those the causal loss
    averages over: every label but the first of a row, -100 aside), summed over batches and processes, and divided
    by their number."""

    _eval_token_loss = None  # (summed loss, label tokens) of the batches evaluated so far, every process's

    def evaluation_loop(self, *args, **kwargs):
        self._eval_token_loss = None
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_token_loss is not None and self._eval_token_loss[1] > 0:
            total, tokens = self._eval_token_loss.tolist()
            output.metrics[f"{prefix}_loss"] = total / tokens
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        import torch

        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        targets = inputs.get("shift_labels")
        if targets is None and inputs.get("labels") is not None:
            targets = inputs["labels"][..., 1:]
        if loss is not None and targets is not None:
            tokens = (targets != -100).sum().to(loss.device, torch.float64)
            both = self.accelerator.gather(torch.stack([loss.detach().double() * tokens, tokens])[None]).sum(0)
            self._eval_token_loss = both if self._eval_token_loss is None else self._eval_token_loss + both
        return loss, logits, labels


def build_trainer(model, tokenizer, train_set, config, precision: str, eval_set=None):
    """An SFTTrainer over the formatted rows (`prompt` and `completion` columns), watched by the live plot and
    the loss guard; with an eval_set, the held-out loss (token-weighted: TokenWeightedEvalLoss) is logged every
    eval_steps."""
    from trl import SFTTrainer

    trainer_class = type("SFTTrainer", (TokenWeightedEvalLoss, SFTTrainer), {})
    return trainer_class(model=model, processing_class=tokenizer, train_dataset=train_set, eval_dataset=eval_set,
                         args=sft_config(config, precision, with_eval=eval_set is not None), callbacks=watchers(config))
