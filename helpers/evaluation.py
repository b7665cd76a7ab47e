"""Held-out evaluation of a causal LM: log-likelihood of responses, loss and perplexity, preference accuracy."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from helpers.data import check_rows
from helpers.prompts import format_generation_prompt, format_training_text

log = logging.getLogger(__name__)


def _encode(tokenizer, template: str, pairs: Sequence[tuple[str, str]],
            max_length: int | None, system_prompt: str = "") -> list[tuple[list[int], int]]:
    """(token ids, number of leading prompt tokens) for each (prompt, response) pair, as the model will score it."""
    eos = tokenizer.eos_token
    prompt_texts = [format_generation_prompt(template, prompt, tokenizer, system_prompt) for prompt, _ in pairs]
    full_texts = [format_training_text(template, prompt, response, eos, tokenizer, system_prompt)
                  for prompt, response in pairs]
    for prompt_text, full_text in zip(prompt_texts, full_texts):
        if not full_text.startswith(prompt_text):
            raise ValueError(f"template {template!r}: the training text does not start with the generation prompt, "
                             "so the response cannot be told apart from the prompt")
    response_texts = [full[len(prompt):] for prompt, full in zip(prompt_texts, full_texts)]
    # Special tokens (a BOS) go with the prompt, as in training; the response part gets none added.
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(full_texts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response_texts, add_special_tokens=False)["input_ids"]

    encoded, merged, truncated = [], 0, 0
    for prompt, full, response in zip(prompt_ids, full_ids, response_ids):
        if full[:len(prompt)] == prompt:
            # The boundary is clean: score the full text's own tokens, exactly what training fed the model.
            ids = list(full)
        else:
            # A BPE merged characters across the prompt/response boundary, so no token split of the full text
            # separates them. Tokenizing prompt and response separately and concatenating the ids gives a clean
            # split: every response token is then conditioned on exactly the prompt and scored on its own.
            ids = list(prompt) + list(response)
            merged += 1
        if not prompt:
            raise ValueError("the prompt tokenized to nothing; the first response token would have no context")
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]  # keep the start: the prompt, then as much of the response as fits
            truncated += 1
        encoded.append((ids, min(len(prompt), len(ids))))
    if merged:
        log.info("%d of %d rows: a token spans the prompt/response boundary; scored prompt and response tokenized "
                 "separately", merged, len(pairs))
    if truncated:
        log.warning("%d of %d rows truncated to max_length=%d tokens; their responses are scored in part",
                    truncated, len(pairs), max_length)
    return encoded


def response_logprobs(model, tokenizer, template: str, pairs: Sequence[tuple[Any, str]], batch_size: int = 8,
                      progress: bool = True, max_length: int | None = None, system_prompt: str = "",
                      batch_tokens: int | None = None) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each pair's response (EOS included) given its prompt, in input order.
    Batches hold at most batch_size rows and, with batch_tokens, at most that many tokens (rows x the longest)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1 (or None for no limit), got {max_length}")
    # Identical pairs are scored once and get identical scores; a prompt may be a conversation (a list of
    # messages), so pairs are compared by their JSON text.
    keys = [json.dumps(pair, sort_keys=True) for pair in pairs]
    first: dict[str, tuple[Any, str]] = {}
    for key, pair in zip(keys, pairs):
        first.setdefault(key, pair)
    unique_keys, unique = list(first), list(first.values())
    encoded = _encode(tokenizer, template, unique, max_length, system_prompt) if unique else []
    # Longest first: rows of similar length share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)

    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc="scoring", unit="row",
                                          disable=not progress) as bar:
            for batch in _batches(order, [len(ids) for ids, _ in encoded], batch_size, batch_tokens):
                for index, score in zip(batch, _score_batch(model, [encoded[i] for i in batch], pad_id)):
                    scores[index] = score
                bar.update(len(batch))
    finally:
        model.train(was_training)
    by_key = dict(zip(unique_keys, scores))
    return [by_key[key] for key in keys]


def _batches(order: list[int], lengths: list[int], batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """The rows of `order` (longest first) cut into batches of at most batch_size rows and, with batch_tokens, at
    most that many tokens once padded to the batch's first (longest) row; never an empty batch."""
    batches: list[list[int]] = []
    for index in order:
        batch = batches[-1] if batches else None
        if batch is None or len(batch) == batch_size or (
                batch_tokens is not None and (len(batch) + 1) * lengths[batch[0]] > batch_tokens):
            batches.append([index])
        else:
            batch.append(index)
    return batches


def _score_batch(model, rows: list[tuple[list[int], int]], pad_id: int) -> list[tuple[float, int]]:
    """Scores of one batch of (ids, prompt length) rows, right-padded into a single forward pass."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, _) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    scores = []
    for row, (ids, n_prompt) in enumerate(rows):
        n_response = len(ids) - n_prompt
        if n_response <= 0:
            scores.append((0.0, 0))
            continue
        # The logits at position t predict token t + 1. float32 here, whatever the model's dtype (fp16, 4-bit):
        # logsumexp over a large vocabulary in half precision loses the small differences being measured.
        predicting = logits[row, n_prompt - 1:len(ids) - 1].float()
        targets = input_ids[row, n_prompt:len(ids)]
        token_logprobs = predicting.gather(-1, targets[:, None]).squeeze(-1) - predicting.logsumexp(-1)
        scores.append((token_logprobs.sum().item(), n_response))
    return scores


def loss_summary(scores: Sequence[tuple[float, int]]) -> dict[str, float | int]:
    """Mean per-token loss (total NLL / total tokens), its perplexity, and the counts, from response scores."""
    n_tokens = sum(n for _, n in scores)
    if n_tokens == 0:
        raise ValueError("no response tokens to score (is max_length shorter than the prompts?)")
    loss = -sum(logprob for logprob, _ in scores) / n_tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return {"loss": loss, "perplexity": perplexity, "n_tokens": n_tokens, "n_rows": len(scores)}


def score_responses(model, tokenizer, template: str, prompts: Sequence[Any], responses: Sequence[str],
                    batch_size: int = 8, progress: bool = True, max_length: int | None = None,
                    system_prompt: str = "") -> dict[str, Any]:
    """Mean per-token loss and perplexity of the responses given their prompts."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up")
    scores = response_logprobs(model, tokenizer, template, list(zip(prompts, responses)), batch_size=batch_size,
                               progress=progress, max_length=max_length, system_prompt=system_prompt)
    return loss_summary(scores)


def preference_metrics(chosen_scores: Sequence[tuple[float, int]], rejected_scores: Sequence[tuple[float, int]],
                       tie_tolerance: float = 0.0) -> dict[str, float | int]:
    """Share of rows whose chosen response is likelier per token than the rejected one (ties half), and the margin."""
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"got {len(chosen_scores)} chosen scores but {len(rejected_scores)} rejected; "
                         "they must pair up")
    margins, skipped = [], 0
    for (chosen, n_chosen), (rejected, n_rejected) in zip(chosen_scores, rejected_scores):
        if n_chosen <= 0 or n_rejected <= 0:
            skipped += 1  # nothing scored (truncated away): no per-token likelihood to compare
            continue
        margins.append(chosen / n_chosen - rejected / n_rejected)
    if skipped:
        log.warning("%d of %d rows skipped: a response has no scored tokens", skipped, len(chosen_scores))
    if not margins:
        raise ValueError("no rows to compare: every row has a response without scored tokens")
    ties = sum(abs(margin) <= tie_tolerance for margin in margins)
    wins = sum(margin > tie_tolerance for margin in margins)
    return {
        "preference_accuracy": (wins + 0.5 * ties) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "n_ties": ties,
        "n_rows": len(margins),
        "n_skipped": skipped,
    }


def evaluate_model(model, tokenizer, template: str, rows: Sequence[dict[str, Any]], prompt_field: str,
                   response_field: str, rejected_field: str | None = None, max_rows: int | None = None,
                   batch_size: int = 8, max_length: int | None = None, progress: bool = True,
                   system_prompt: str = "", batch_tokens: int | None = None) -> dict[str, Any]:
    """Loss and perplexity on the responses; preference accuracy and margin against rejected ones when given."""
    rows = list(rows)[:max_rows] if max_rows is not None else list(rows)
    check_rows(rows, {"prompt_field": prompt_field, "response_field": response_field}, "evaluation rows")
    note = None
    if rejected_field is None:
        note = "no rejected_field given: preference metrics skipped"
    else:
        missing = sum(not isinstance(row.get(rejected_field), str) or not row[rejected_field].strip() for row in rows)
        if missing:
            note = (f"rejected_field {rejected_field!r} is missing, empty or not text in {missing} of {len(rows)} "
                    "rows: preference metrics skipped")

    pairs = [(row[prompt_field], row[response_field]) for row in rows]
    if note is None:
        pairs += [(row[prompt_field], row[rejected_field]) for row in rows]
    scores = response_logprobs(model, tokenizer, template, pairs, batch_size=batch_size, progress=progress,
                               max_length=max_length, system_prompt=system_prompt,
                               batch_tokens=batch_tokens)  # chosen, rejected: one pass
    chosen = scores[:len(rows)]
    result: dict[str, Any] = loss_summary(chosen)
    if note is None:
        preference = preference_metrics(chosen, scores[len(rows):])
        result.update(preference_accuracy=preference["preference_accuracy"], mean_margin=preference["mean_margin"],
                      n_ties=preference["n_ties"], preference_rows=preference["n_rows"],
                      preference_skipped=preference["n_skipped"])
    else:
        result["note"] = note
        log.info(note)
    log.info("evaluation on %d rows: %s", len(rows),
             ", ".join(f"{key}={value:.4g}" for key, value in result.items() if isinstance(value, float)))
    return result
