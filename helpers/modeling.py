"""Loading the base model through unsloth, adding LoRA, and reloading a trained adapter for inference."""
from __future__ import annotations

import logging
from pathlib import Path

from helpers.stack import FastLanguageModel
from helpers.environment import torch_dtype
from helpers.reliability import check_model_source

log = logging.getLogger(__name__)


def load_base_model(config, precision: str):
    """The base model and tokenizer, 4-bit when asked, in the resolved precision."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model_name,
        max_seq_length=config.max_seq_length,
        dtype=torch_dtype(precision),
        load_in_4bit=config.load_in_4bit,
    )
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {config.model_name!r} has no EOS token; generation could never stop")
    return model, tokenizer


def load_tokenizer(config):
    """The model's tokenizer alone (fast: used to check and format the data before the model loads)."""
    from transformers import AutoTokenizer

    check_model_source(config.model_name)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name)
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {config.model_name!r} has no EOS token; generation could never stop")
    return tokenizer


def add_lora(model, config):
    """Wrap the model with trainable LoRA adapters on the configured modules."""
    return FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=config.seed,
        max_seq_length=config.max_seq_length,
    )


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_trained_model(config, precision: str, adapter_dir: str | Path):
    """The base model with a saved adapter on top, in unsloth's inference mode.

    Loaded from the adapter folder, as unsloth documents, so that unsloth's save methods are bound to the LoRA
    wrapper (bound to the bare base model, as `PeftModel.from_pretrained` leaves them, a merged save would
    write the un-merged layers).
    """
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir), max_seq_length=config.max_seq_length, dtype=torch_dtype(precision),
        load_in_4bit=config.load_in_4bit)
    FastLanguageModel.for_inference(model)
    return model, tokenizer
