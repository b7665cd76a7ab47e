"""Preference tuning's model and trainer: DPO with LoRA through trl's DPOTrainer, from the base model or continuing
an SFT run's adapter (helpers.fine_tuning runs it as it runs SFT).

The reference model is never a second copy of the weights. With reference='base' (the default) it is the same
model with its adapter disabled; with reference='sft' it is a frozen copy of the SFT adapter (trl's "ref"
adapter: one more adapter in memory, the base weights shared), the reference of the DPO paper.
"""
from __future__ import annotations

from pathlib import Path

from helpers import modeling, trainers
from helpers.stack import FastLanguageModel  # unsloth before trl


def dpo_config(config, precision: str, with_eval: bool = False):
    """trl's DPOConfig: the shared recipe (batch shape, schedule, optimizer, checkpoints) plus beta and the loss;
    max_seq_length bounds prompt and answer together (DPOConfig's max_length)."""
    from trl import DPOConfig

    return DPOConfig(**trainers.trainer_arguments(config, precision, with_eval), beta=config.beta,
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
                         callbacks=trainers.watchers(config))
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
