"""Checking a GGUF file against the tuned model: run by llama.cpp itself (llama-completion of the same build,
greedy), loaded back with transformers (dequantized), and its tokenizer compared with the tuned one.

Two agreements with the tuned model's greedy answer are recorded, each over its tokens:
- prefix_agreement: the share that llama.cpp's own greedy answer repeats before the first token that differs
  (free-running, what a user sees; one early flip of a near-tie costs everything after it);
- token_agreement: the share llama.cpp picks greedily given the tuned answer before each one (teacher-forced,
  as the reload check's token_agreement). llama-completion takes text, not tokens, so it is fed by restarts:
  where its answer first differs, that position counts as a miss and it is run again from the prompt plus the
  tuned answer up to and including that token, until the answer is covered (at most MAX_RUNS runs).
llama.cpp's tokens are its answer's text tokenized by the tuned tokenizer (plus EOS where it stopped there);
each run also checks that llama.cpp read the prompt, and the forced prefix, as the same token ids (a restart
whose forced text tokenizes otherwise is counted, not hidden).

transformers 5.17 reads a Llama GGUF's EOS as its BOS token (integrations/ggml.py, GGUFLlamaConverter);
llama.cpp reads the file's `tokenizer.ggml.eos_token_id`, and so does the reload here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers.llama_cpp import completion

MAX_RUNS = 8  # llama-completion runs for the teacher-forced agreement: the first, and one after each miss
ROUND_TRIP_ROWS = 3  # held-out rows whose training text is tokenized before and after
# Digits, runs of spaces, tabs and newlines, accents, CJK and emoji: where byte-level tokenizers differ.
ROUND_TRIP_TEXT = "In 2024 I paid 33,333.50 € for 3 cafés!\n\n\tTabs,  two spaces; 日本語 🚀 'quoted' \"text\"..."


def _matching(expected: list[int], got: list[int]) -> int:
    """How many of expected's tokens got repeats, in order, before the first difference."""
    same = 0
    for want, have in zip(expected, got):
        if want != have:
            break
        same += 1
    return same


def llama_cpp_check(gguf_file: Path, prompt_text: str, expected: dict[str, Any], tokenizer, max_tokens: int,
                    lora: Path | None = None) -> dict[str, Any]:
    """Run the GGUF (with lora: the adapter GGUF on the base GGUF gguf_file) in llama-completion, greedily, on the
    check prompt in the run's template, and compare its answer with the tuned model's (see the module's notes)."""
    answer_ids, prompt_ids = expected["answer_ids"], expected["prompt_ids"]
    if not answer_ids:
        raise ValueError("the expected answer has no tokens; there is nothing to agree on")
    position = agreeing = 0
    runs: list[dict[str, Any]] = []
    while position < len(answer_ids) and len(runs) < MAX_RUNS:
        forced = tokenizer.decode(answer_ids[:position], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        result = completion(gguf_file, prompt_text + forced, max_tokens - position, lora=lora)
        ids = tokenizer(result["text"], add_special_tokens=False)["input_ids"]
        if result["stopped_at_eos"]:
            ids.append(tokenizer.eos_token_id)
        same = _matching(answer_ids[position:], ids)
        runs.append({**result, "from_position": position, "matching": same,
                     "same_prompt_tokens": result["prompt_ids"] == prompt_ids + answer_ids[:position]})
        agreeing += same
        position = min(len(answer_ids), position + same + 1)  # the differing token counts as checked, and missed
    first = runs[0]
    text = first["text"].strip()
    return {"ran": True, "answer": text, "same_answer": text == expected["text"],
            "prefix_agreement": round(runs[0]["matching"] / len(answer_ids), 4),
            "token_agreement": round(agreeing / position, 4), "positions_checked": position,
            "answer_tokens": len(answer_ids), "runs": len(runs),
            "same_prompt_tokens": runs[0]["same_prompt_tokens"],
            # restarts whose forced prefix llama.cpp read as other token ids (text that does not tokenize back to
            # the same ids, e.g. a token ending inside a UTF-8 character): there the forcing was approximate
            "forced_runs_tokenized_otherwise": sum(not run["same_prompt_tokens"] for run in runs[1:]),
            "stopped_at_eos": first["stopped_at_eos"], "seconds": round(sum(run["seconds"] for run in runs), 2),
            "peak_rss_gib": max(run["peak_rss_gib"] for run in runs),
            "peak_anon_gib": max(run["peak_anon_gib"] for run in runs), "model": Path(gguf_file).name,
            **({"adapter": Path(lora).name} if lora else {})}


def load_gguf(folder: Path, precision: str):
    """The GGUF file in folder loaded with transformers (dequantized), and its tokenizer with the BOS and EOS
    the file names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.environment import torch_dtype

    name = sorted(folder.glob("*.gguf"))[0].name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch_dtype(precision))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    special = file_special_tokens(folder / name)
    for role in ("bos", "eos"):
        if special.get(role) is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(special[role]))
    return model.eval(), tokenizer


def file_special_tokens(path: Path) -> dict[str, int | None]:
    """The BOS, EOS and padding token ids a GGUF file records."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    keys = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "pad": "tokenizer.ggml.padding_token_id"}
    return {role: int(fields[key].contents()) if key in fields else None for role, key in keys.items()}


def round_trip_texts(tokenizer, config, check_prompt: str) -> list[str]:
    """Texts whose token ids must not change through the GGUF file: the check prompt as the model sees it, a few
    held-out rows as training text (EOS and template tokens included), and a text of digits, spacing and
    non-Latin script."""
    from helpers.data import HeldOutRowsChanged, held_out_rows
    from helpers.prompts import format_generation_prompt, format_training_text

    texts = [format_generation_prompt(config.prompt_template, check_prompt, tokenizer, config.system_prompt)]
    try:
        rows = held_out_rows(config)[:ROUND_TRIP_ROWS]
    except (FileNotFoundError, HeldOutRowsChanged):  # no held-out split, or its rows changed: the fixed texts only
        rows = []
    texts += [format_training_text(config.prompt_template, row[config.prompt_field], row[config.response_field],
                                   tokenizer.eos_token, tokenizer, config.system_prompt) for row in rows]
    return [*texts, ROUND_TRIP_TEXT]


def token_ids(tokenizer, texts: list[str]) -> dict[str, Any]:
    """The ids of each text as generation encodes it (special tokens added), and the special tokens' ids."""
    return {"texts": [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts],
            "special": {role: getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "pad")}}


def tokenizer_round_trip(tokenizer, texts: list[str], expected: dict[str, Any]) -> dict[str, Any]:
    """Compare the reloaded tokenizer's ids with the tuned tokenizer's: exact, and the first text that differs."""
    got = token_ids(tokenizer, texts)
    differing = [i for i, (a, b) in enumerate(zip(expected["texts"], got["texts"])) if a != b]
    special = {role: [expected["special"][role], got["special"][role]] for role in ("bos", "eos")
               if expected["special"][role] != got["special"][role]}
    result: dict[str, Any] = {"exact": not differing and not special, "texts": len(texts),
                              "differing_texts": len(differing)}
    if differing:
        first = differing[0]
        result["first_difference"] = {"text": texts[first][:200], "expected": expected["texts"][first][:40],
                                      "got": got["texts"][first][:40]}
    if special:
        result["special_tokens_differ"] = special  # role: [tuned, reloaded]
    return result
