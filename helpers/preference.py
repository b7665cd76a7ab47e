"""Preference tuning: DPO with LoRA through trl's DPOTrainer, from the base model or continuing an SFT run's adapter.

The reference model is never a second copy of the weights. With reference='base' (the default) it is the same
model with its adapter disabled; with reference='sft' it is a frozen copy of the SFT adapter (trl's "ref"
adapter: one more adapter in memory, the base weights shared), the reference of the DPO paper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import data, modeling, training
from helpers.records import update_run_record
from helpers.stack import FastLanguageModel  # unsloth before trl


def dpo_config(config, precision: str, with_eval: bool = False):
    """trl's DPOConfig: the shared recipe (batch shape, schedule, optimizer, checkpoints) plus beta and the loss;
    max_seq_length bounds prompt and answer together (DPOConfig's max_length)."""
    from trl import DPOConfig

    return DPOConfig(**training.trainer_arguments(config, precision, with_eval), beta=config.beta,
                     loss_type=[config.loss_type], max_length=config.max_seq_length)


def load_policy(config, precision: str):
    """The model to train and its tokenizer: the SFT run's adapter on its base model, trainable, or the base
    model with a fresh adapter."""
    if not config.sft_run_dir:
        model, tokenizer = modeling.load_base_model(config, precision)
        return modeling.add_lora(model, config), tokenizer
    model, tokenizer = modeling.load_adapter_model(config, precision, Path(config.sft_run_dir) / "adapter")
    FastLanguageModel.for_training(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model, tokenizer


def build_trainer(model, tokenizer, train_set, config, precision: str, eval_set=None):
    """A DPOTrainer over prompt/chosen/rejected rows with the reference the config asks for, watched as SFT is."""
    from trl import DPOTrainer

    trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=train_set, eval_dataset=eval_set,
                         args=dpo_config(config, precision, with_eval=eval_set is not None),
                         callbacks=training.watchers(config))
    if config.reference == "base" and "ref" in trainer.model.peft_config:
        # trl copies a loaded adapter into a frozen "ref" adapter; without it the reference is the base model.
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer


def reference_in_use(trainer) -> str:
    """What the trainer scores the reference with, read from the trainer itself (not from the config)."""
    if trainer.ref_model is not None:
        return "a separate reference model"
    if "ref" in trainer.model.peft_config:
        return "a frozen copy of the starting adapter"
    return "the base model, adapter disabled"


def run_preference(config, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Check, split (as the SFT run did, so that its held-out rows stay unseen), format, load, train with DPO and
    record in config.run_dir; returns the metrics."""
    rows = data.load_checked_rows(config, preference=True) if rows is None else rows
    precision = training.prepare_run(config)
    if config.sft_run_dir:
        train_rows, eval_rows = data.reuse_split(rows, config, config.sft_run_dir)
    else:
        train_rows, eval_rows = data.hold_out(rows, config)
    tokenizer = modeling.load_tokenizer(config)
    train_set = data.to_preference_set(train_rows, config, tokenizer)
    eval_set = data.to_preference_set(eval_rows, config, tokenizer) if eval_rows else None
    model, tokenizer = load_policy(config, precision)
    trainer = build_trainer(model, tokenizer, train_set, config, precision, eval_set)
    update_run_record(config.run_dir, stage="dpo", reference=reference_in_use(trainer))
    return training.train_and_record(trainer, model, tokenizer, config)
