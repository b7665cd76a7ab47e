"""Loading the base model through unsloth (after checking that its source is there), adding LoRA, and reloading a
trained adapter for inference."""
from __future__ import annotations

import logging
from pathlib import Path

from helpers.stack import FastLanguageModel
from helpers.data import is_local_path
from helpers.environment import cap_gpu_memory, hub_offline, torch_dtype
from helpers.timing import recorded

log = logging.getLogger(__name__)


def check_model_source(model_name: str) -> None:
    """A local model path must exist; a Hub id must be cached when the Hub is offline."""
    if is_local_path(model_name):
        if not Path(model_name).expanduser().is_dir():
            raise FileNotFoundError(f"model_name {model_name!r} is a local path that does not exist "
                                    "(for the offline tiny model, run 00_setup first)")
        return
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_name, "config.json"), str):
            raise RuntimeError(f"model_name {model_name!r} is a Hub id, but the Hub is offline (HF_HUB_OFFLINE) "
                               "and it is not in the local cache; use the offline profile (-f "
                               "notebooks/params/cpu_tiny.yaml) or a local model path")


def load_base_model(config, precision: str):
    """The base model and tokenizer, 4-bit when asked, in the resolved precision."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model_name,
        max_seq_length=config.max_seq_length,
        dtype=torch_dtype(precision),
        load_in_4bit=config.load_in_4bit,
    )
    return model, _with_eos(tokenizer, config.model_name)


def load_tokenizer(config):
    """The model's tokenizer alone (fast: used to check and format the data before the model loads)."""
    from transformers import AutoTokenizer

    check_model_source(config.model_name)
    return _with_eos(AutoTokenizer.from_pretrained(config.model_name), config.model_name)


def _with_eos(tokenizer, model_name: str):
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {model_name!r} has no EOS token; generation could never stop")
    return tokenizer


def add_lora(model, config, gradient_checkpointing: bool | str = "unsloth"):
    """Wrap the model with trainable LoRA adapters on the configured modules. gradient_checkpointing: "unsloth"
    (the recipe's: checkpointed layer inputs offloaded to the CPU) or True (kept on the GPU; helpers.micro_batching)."""
    return FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_gradient_checkpointing=gradient_checkpointing,
        random_state=config.lora_random_state,
        max_seq_length=config.max_seq_length,
    )


def load_adapter_model(config, precision: str, adapter_dir: str | Path):
    """The base model with a saved adapter on top (trainable), and the tokenizer saved with it.

    Loaded from the adapter folder, as unsloth documents, so that unsloth's save methods are bound to the LoRA
    wrapper (bound to the bare base model, as `PeftModel.from_pretrained` leaves them, a merged save would
    write the un-merged layers).
    """
    cap_gpu_memory(config.max_gpu_memory_gib)  # inference, evaluation and export stay T4-sized as training did
    return FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir), max_seq_length=config.max_seq_length, dtype=torch_dtype(precision),
        load_in_4bit=config.load_in_4bit)


@recorded("tuned model loaded")
def load_trained_model(config, precision: str, adapter_dir: str | Path):
    """The base model with a saved adapter on top, in unsloth's inference mode."""
    model, tokenizer = load_adapter_model(config, precision, adapter_dir)
    FastLanguageModel.for_inference(model)
    return model, tokenizer
