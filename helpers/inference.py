"""Generating with a trained run: the same prompt template as training, greedy or sampled, streamed when watched."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.prompts import format_generation_prompt
from helpers.records import atomic_write_text


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
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
            **sampling,
        )
    width = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), output[0, width:].tolist()


def generate_all(model, tokenizer, config, stream: bool = False) -> list[dict[str, Any]]:
    """Answers to every prompt of the config, in order, each with the settings that produced it."""
    from tqdm.auto import tqdm

    results = []
    for prompt in tqdm(config.prompts, desc="generating", disable=stream):
        if stream:
            print(f"\n### {prompt}\n")
        response = generate(model, tokenizer, prompt, config.prompt_template, config.max_new_tokens,
                            config.temperature, stream=stream, system_prompt=config.system_prompt)
        results.append({"prompt": prompt, "response": response, "max_new_tokens": config.max_new_tokens,
                        "temperature": config.temperature})
    return results


def save_generations(run_dir: str | Path, generations: list[dict[str, Any]]) -> Path:
    """Atomically write generations as run_dir/generations.jsonl."""
    lines = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    return atomic_write_text(Path(run_dir) / "generations.jsonl", lines)
