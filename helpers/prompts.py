"""Prompt templates: how a (prompt, response) pair becomes training text, and a prompt becomes model input.

Two templates. `alpaca` is the tutorial's "### Instruction / ### Response" text. `chat` renders a conversation
with the tokenizer's own chat template (for DeepSeek-R1-Distill: `<｜User｜>` / `<｜Assistant｜>` turns).

The <think> policy for `chat`: the data has no reasoning, so every assistant turn starts with an empty think
block, `<think>\\n\\n</think>\\n\\n`, at training and at inference alike. The model learns to answer right after
it, and at inference the block is already in the prompt, so it answers directly instead of opening a think
block it never saw filled in training. Tokenizers whose chat template has no think block get none.

In both templates the training text is exactly the generation prompt followed by the response and one EOS,
so the prompt part can be masked out of the loss (`train_on_responses_only`) and scored apart from the
response in evaluation.
"""
from __future__ import annotations

from typing import Any

# The tutorial's Alpaca-style prompt, without the optional "### Input:" block.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n{response}"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"
PROMPT_TEMPLATES = ("alpaca", "chat")


def format_alpaca_prompt(instruction: str, response: str = "", eos_token: str = "") -> str:
    """The Alpaca text for one row; with no response it ends where the model should start writing."""
    return ALPACA_TEMPLATE.format(instruction=instruction, response=response) + eos_token


def as_messages(prompt: Any, system_prompt: str = "") -> list[dict[str, str]]:
    """A prompt (one user message as a string, or a list of {"role", "content"} messages ending with a user
    turn) as a message list, with the system prompt first when one is given and none is there."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def format_generation_prompt(template: str, prompt: Any, tokenizer=None, system_prompt: str = "") -> str:
    """The text a model is given at inference time, in the template it was trained with."""
    check_template(template)
    if template == "alpaca":
        last_user = prompt if isinstance(prompt, str) else [m for m in prompt if m["role"] == "user"][-1]["content"]
        return format_alpaca_prompt(last_user)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_template 'chat' needs a tokenizer with a chat template; this one has none "
                         "(use prompt_template='alpaca')")
    text = tokenizer.apply_chat_template(as_messages(prompt, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds BOS itself: keep it from appearing twice
    if "</think>" in tokenizer.chat_template:
        # Newer R1 templates already open the block with "<think>\n"; close it empty either way.
        text = text + EMPTY_THINK[len("<think>\n"):] if text.endswith("<think>\n") else text + EMPTY_THINK
    return text


def format_training_text(template: str, prompt: Any, response: str, eos_token: str, tokenizer=None,
                         system_prompt: str = "") -> str:
    """Training text for one row: the generation prompt, the response, exactly one EOS."""
    return format_generation_prompt(template, prompt, tokenizer, system_prompt) + with_one_eos(response, eos_token)


def with_one_eos(response: str, eos_token: str) -> str:
    """The response ending in exactly one EOS (any it already ends with are dropped first)."""
    if not eos_token:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    while response.endswith(eos_token):
        response = response.removesuffix(eos_token)
    return response + eos_token


def check_template(template: str) -> None:
    """Raise a ValueError naming the accepted templates when `template` is not one of them."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt_template {template!r} is unknown; choose one of: {', '.join(PROMPT_TEMPLATES)}")
