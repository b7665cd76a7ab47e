"""Prompt templates: how a (prompt, response) pair becomes training text, and a prompt becomes model input."""
from __future__ import annotations

# The tutorial's Alpaca-style prompt, without the optional "### Input:" block.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n{response}"
)

PROMPT_TEMPLATES = ("alpaca",)


def format_alpaca_prompt(instruction: str, response: str = "", eos_token: str = "") -> str:
    """The Alpaca text for one row; with no response it ends where the model should start writing."""
    return ALPACA_TEMPLATE.format(instruction=instruction, response=response) + eos_token


def format_training_text(template: str, prompt: str, response: str, eos_token: str) -> str:
    """Training text for one row in the given template, ending in exactly one EOS."""
    check_template(template)
    if not eos_token:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    while response.endswith(eos_token):
        response = response.removesuffix(eos_token)
    return format_alpaca_prompt(prompt, response, eos_token)


def format_generation_prompt(template: str, prompt: str) -> str:
    """The text a model is given at inference time, in the template it was trained with."""
    check_template(template)
    return format_alpaca_prompt(prompt)


def check_template(template: str) -> None:
    """Raise a ValueError naming the accepted templates when `template` is not one of them."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt_template {template!r} is unknown; choose one of: {', '.join(PROMPT_TEMPLATES)}")
