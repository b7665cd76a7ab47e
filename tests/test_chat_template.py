"""Chat-template mode and loss on responses only: the rendered text, the loss mask, conversation datasets."""
from __future__ import annotations

import json

import pytest

from helpers.config import RunConfig
from helpers.data import from_conversations, load_checked_rows, to_training_set
from helpers.prompts import EMPTY_THINK, format_generation_prompt, format_training_text


@pytest.fixture(scope="module")
def tokenizer():
    from helpers.local_models import build_tokenizer

    return build_tokenizer()


def test_chat_prompt_is_r1_shaped_with_an_empty_think_block(tokenizer):
    prompt = format_generation_prompt("chat", "Hi there?", tokenizer, system_prompt="Be warm.")
    assert prompt == "<|begin_of_text|>Be warm.<｜User｜>Hi there?<｜Assistant｜>" + EMPTY_THINK
    text = format_training_text("chat", "Hi there?", "Hello!", tokenizer.eos_token, tokenizer)
    assert text == "<|begin_of_text|><｜User｜>Hi there?<｜Assistant｜><think>\n\n</think>\n\nHello!<|end_of_text|>"


def test_training_text_starts_with_the_inference_prompt_in_both_templates(tokenizer):
    for template in ("alpaca", "chat"):
        prompt = format_generation_prompt(template, "Hi there?", tokenizer)
        assert format_training_text(template, "Hi there?", "Hello!", tokenizer.eos_token, tokenizer) == (
            prompt + "Hello!" + tokenizer.eos_token)


def test_bos_is_not_doubled_when_the_tokenizer_adds_it(tokenizer):
    from tokenizers import processors

    adds_bos = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token,
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    adds_bos.chat_template = tokenizer.chat_template
    adds_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    text = format_generation_prompt("chat", "Hi?", adds_bos)
    assert not text.startswith(tokenizer.bos_token)
    assert adds_bos(text)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_chat_without_a_chat_template_is_a_clear_error(tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template.*alpaca"):
        format_generation_prompt("chat", "Hi?", plain)


def test_multi_turn_conversation_renders_every_turn(tokenizer):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hey!"},
                {"role": "user", "content": "How are you?"}]
    prompt = format_generation_prompt("chat", messages, tokenizer)
    assert prompt == ("<|begin_of_text|><｜User｜>Hi!<｜Assistant｜>Hey!<|end_of_text|><｜User｜>How are you?"
                      "<｜Assistant｜>" + EMPTY_THINK)
    assert format_generation_prompt("alpaca", messages).endswith("### Instruction:\nHow are you?\n\n### Response:\n")


@pytest.mark.parametrize("kind", ["messages", "sharegpt"])
def test_conversation_datasets_are_mapped_to_prompt_and_response(tmp_path, kind):
    turns = [("system", "Be warm."), ("user", "Hi!"), ("assistant", "Hey there!")]
    if kind == "messages":
        row = {"messages": [{"role": r, "content": c} for r, c in turns], "rejected": "Greetings."}
    else:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        row = {"conversations": [{"from": names[r], "value": c} for r, c in turns], "rejected": "Greetings."}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (mapped,) = load_checked_rows(RunConfig(dataset=str(path), prompt_template="chat"))
    assert mapped["prompt"] == [{"role": "system", "content": "Be warm."}, {"role": "user", "content": "Hi!"}]
    assert mapped["chosen"] == "Hey there!" and mapped["rejected"] == "Greetings."
    with pytest.raises(ValueError, match=r"row 1: a conversation of 3 turns \(roles system, user, assistant\).*"
                                         r"would drop the other turns; use prompt_template=\"chat\""):
        load_checked_rows(RunConfig(dataset=str(path)))  # alpaca: one instruction, one response


def test_a_single_exchange_is_accepted_under_the_alpaca_template():
    rows = [{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hey!"}]}]
    (mapped,) = from_conversations(rows, RunConfig(), "chats.jsonl")
    assert mapped["prompt"] == [{"role": "user", "content": "Hi!"}] and mapped["chosen"] == "Hey!"


def test_a_conversation_must_end_with_user_then_assistant():
    rows = [{"messages": [{"role": "user", "content": "Hi!"}]}]
    with pytest.raises(ValueError, match="row 1: a conversation must end with a user turn and then an assistant"):
        from_conversations(rows, RunConfig(), "chats.jsonl")
    rows = [{"conversations": [{"from": "robot", "value": "Hi!"}]}]
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        from_conversations(rows, RunConfig(), "chats.jsonl")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import helpers.stack  # noqa: F401
    from helpers.local_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("responses_only", [True, False])
def test_labels_are_masked_exactly_on_the_prompt(tiny_model_dir, tmp_path, template, responses_only):
    from helpers import modeling, trainers

    config = RunConfig(model_name=str(tiny_model_dir), dataset="x.jsonl", load_in_4bit=False, precision="fp32",
                       max_seq_length=256, prompt_template=template, train_on_responses_only=responses_only,
                       lora_r=4, lora_alpha=8, optim="adamw_torch", run_dir=str(tmp_path / "run"))
    model, tokenizer = modeling.load_base_model(config, "fp32")
    rows = [{"prompt": "What's your favorite season?", "chosen": "Autumn, hands down!"}]
    train_set = to_training_set(rows, config, tokenizer)
    trainer = trainers.build_trainer(modeling.add_lora(model, config), tokenizer, train_set, config, "fp32")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(tokenizer(train_set[0]["prompt"])["input_ids"])
    assert ids == tokenizer(train_set[0]["prompt"] + train_set[0]["completion"])["input_ids"]
    if responses_only:
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(ids[n_prompt:]) == "Autumn, hands down!" + tokenizer.eos_token
    else:
        assert labels == ids
