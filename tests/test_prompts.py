"""Prompt templates: the exact tutorial text, one EOS per training example, and clear errors."""
from __future__ import annotations

import pytest

from helpers.prompts import (
    PROMPT_TEMPLATES,
    check_template,
    format_alpaca_prompt,
    format_generation_prompt,
    format_training_text,
)

EOS = "<|end_of_text|>"


def test_alpaca_prompt_is_the_tutorial_text():
    text = format_alpaca_prompt("Say hi.", "Hi there!", EOS)
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\nHi there!<|end_of_text|>"
    )


def test_alpaca_prompt_without_response_or_eos_ends_at_response_header():
    assert format_alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )


def test_training_text_is_alpaca_plus_one_eos():
    text = format_training_text("alpaca", "Say hi.", "Hi there!", EOS)
    assert text == format_alpaca_prompt("Say hi.", "Hi there!", EOS)
    assert text.endswith("### Response:\nHi there!" + EOS)
    assert text.count(EOS) == 1


def test_training_text_does_not_double_an_existing_eos():
    text = format_training_text("alpaca", "Say hi.", "Hi there!" + EOS, EOS)
    assert text.endswith("Hi there!" + EOS)
    assert text.count(EOS) == 1


@pytest.mark.parametrize("eos", ["", None])
def test_training_text_requires_an_eos_token(eos):
    with pytest.raises(ValueError, match="no EOS token"):
        format_training_text("alpaca", "Say hi.", "Hi there!", eos)


def test_generation_prompt_ends_where_the_model_writes_and_has_no_eos():
    text = format_generation_prompt("alpaca", "Say hi.")
    assert text.endswith("### Response:\n")
    assert "### Instruction:\nSay hi.\n\n" in text
    assert EOS not in text
    # The training text for the same prompt starts with exactly this text.
    assert format_training_text("alpaca", "Say hi.", "Hi there!", EOS).startswith(text)


@pytest.mark.parametrize("call", [
    lambda: format_training_text("alpacca", "p", "r", EOS),
    lambda: format_generation_prompt("alpacca", "p"),
    lambda: check_template("alpacca"),
])
def test_unknown_template_names_itself_and_the_accepted_ones(call):
    with pytest.raises(ValueError, match=r"'alpacca'.*alpaca") as info:
        call()
    for name in PROMPT_TEMPLATES:
        assert name in str(info.value)


def test_eos_is_exactly_one_token_with_a_real_tokenizer():
    from helpers.local_models import build_tokenizer

    tokenizer = build_tokenizer()
    assert tokenizer.eos_token
    for response in ("Hi there!", "Hi there!" + tokenizer.eos_token, "Hi there!" + 2 * tokenizer.eos_token):
        text = format_training_text("alpaca", "Say hi.", response, tokenizer.eos_token)
        ids = tokenizer(text)["input_ids"]
        assert ids.count(tokenizer.eos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id
    prompt_ids = tokenizer(format_generation_prompt("alpaca", "Say hi."))["input_ids"]
    assert tokenizer.eos_token_id not in prompt_ids
