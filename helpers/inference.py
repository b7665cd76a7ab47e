"""Generating with a trained run: the same prompt template as training, greedy or sampled, streamed when watched,
else batched."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.prompts import format_generation_prompt
from helpers.records import atomic_write_text
from helpers.timing import recorded


def sampling(temperature: float) -> dict:
    """model.generate's sampling arguments: greedy at temperature 0, else sampled at that temperature."""
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}


def generate(model, tokenizer, prompt, template: str, max_new_tokens: int, temperature: float,
             stream: bool = False, system_prompt: str = "") -> str:
    """The model's answer to one prompt (temperature 0 = greedy), without the prompt text; rendered exactly as
    in training (same template, same system prompt)."""
    _, new_tokens = generate_tokens(model, tokenizer, prompt, template, max_new_tokens, temperature, stream,
                                    system_prompt)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def generate_tokens(model, tokenizer, prompt, template: str, max_new_tokens: int, temperature: float,
                    stream: bool = False, system_prompt: str = "") -> tuple[list[int], list[int]]:
    """(prompt token ids, generated token ids) of the model's answer to one prompt, as `generate` renders it."""
    import torch
    from transformers import TextStreamer

    text = format_generation_prompt(template, prompt, tokenizer, system_prompt)
    inputs = tokenizer([text], return_tensors="pt", add_special_tokens=True).to(model.device)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
            **sampling(temperature),
        )
    width = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), output[0, width:].tolist()


@recorded("answers generated")
def generate_all(model, tokenizer, config, stream: bool = False) -> list[dict[str, Any]]:
    """Answers to every prompt of the config, in order, each with the settings that produced it: streamed one by one
    while a person watches, else all prompts in one batch."""
    if stream:
        responses = []
        for prompt in config.prompts:
            print(f"\n### {prompt}\n")
            responses.append(generate(model, tokenizer, prompt, config.prompt_template, config.max_new_tokens,
                                      config.temperature, stream=True, system_prompt=config.system_prompt))
    else:
        responses = generate_batch(model, tokenizer, config.prompts, config.prompt_template, config.max_new_tokens,
                                   config.temperature, config.system_prompt)
    return [{"prompt": prompt, "response": response, "max_new_tokens": config.max_new_tokens,
             "temperature": config.temperature} for prompt, response in zip(config.prompts, responses)]


def generate_batch(model, tokenizer, prompts: list, template: str, max_new_tokens: int, temperature: float,
                   system_prompt: str = "") -> list[str]:
    """The model's answers to all prompts at once (one generate call, prompts padded on the left), each rendered and
    decoded as `generate` does it."""
    import torch

    texts = [format_generation_prompt(template, prompt, tokenizer, system_prompt) for prompt in prompts]
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True).to(model.device)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id if pad is not None else tokenizer.eos_token_id,
                                **sampling(temperature))
    width = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


def save_generations(run_dir: str | Path, generations: list[dict[str, Any]]) -> Path:
    """Atomically write generations as run_dir/generations.jsonl."""
    lines = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    return atomic_write_text(Path(run_dir) / "generations.jsonl", lines)
