"""Held-out scoring: response-only log-likelihoods, loss/perplexity, preference accuracy, on the tiny random Llama."""
from __future__ import annotations

import copy
import json
import logging
import math
import random

import pytest
import torch

from helpers.data import SAMPLE_DATASET, read_local_rows
from helpers.evaluation import (
    evaluate_model,
    loss_summary,
    preference_metrics,
    response_logprobs,
    score_responses,
)
from helpers.prompts import format_generation_prompt, format_training_text

TEMPLATE = "alpaca"
ROWS = read_local_rows(SAMPLE_DATASET)[:12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer): the tiny random Llama and its tokenizer, built once for this module."""
    import helpers.stack  # noqa: F401  (unsloth patches transformers before it loads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.local_models import build_random_llama

    path = build_random_llama(tmp_path_factory.mktemp("models") / "tiny", "tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def sample_scores(tiny):
    """(chosen, rejected) response scores of ROWS, computed once."""
    model, tokenizer = tiny
    return (response_logprobs(model, tokenizer, TEMPLATE, pairs_of(ROWS), progress=False),
            response_logprobs(model, tokenizer, TEMPLATE, pairs_of(ROWS, "rejected"), progress=False))


def pairs_of(rows, field="chosen"):
    return [(row["prompt"], row[field]) for row in rows]


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- response_logprobs


def test_batched_scores_match_one_row_at_a_time_in_input_order(tiny):
    model, tokenizer = tiny
    pairs = pairs_of(ROWS[:5]) + pairs_of(ROWS[:4], "rejected") + [pairs_of(ROWS)[1]]  # one duplicate
    lengths = [n_tokens(tokenizer, format_training_text(TEMPLATE, p, r, tokenizer.eos_token)) for p, r in pairs]
    assert lengths != sorted(lengths, reverse=True)  # the batches really are reordered (and padded)
    batched = response_logprobs(model, tokenizer, TEMPLATE, pairs, batch_size=3, progress=False)
    alone = [response_logprobs(model, tokenizer, TEMPLATE, [pair], progress=False)[0] for pair in pairs]
    assert len(batched) == len(pairs)
    # Sums of hundreds of float32 log-probs, taken in another order (padding, batch shape, thread count): equal
    # within a tolerance relative to their size, not to the last bit.
    for (logprob, count), (logprob_alone, count_alone) in zip(batched, alone):
        assert count == count_alone
        assert logprob == pytest.approx(logprob_alone, rel=1e-5)
    assert batched[-1][1] == batched[1][1] and batched[-1][0] == pytest.approx(batched[1][0], rel=1e-5)
    assert len({round(logprob, 3) for logprob, _ in batched[:-1]}) == len(pairs) - 1  # rows really differ


def test_scores_equal_the_models_own_masked_loss(tiny):
    model, tokenizer = tiny
    prompt, response = pairs_of(ROWS)[2]
    logprob, count = response_logprobs(model, tokenizer, TEMPLATE, [(prompt, response)], progress=False)[0]
    ids = tokenizer(format_training_text(TEMPLATE, prompt, response, tokenizer.eos_token),
                    return_tensors="pt")["input_ids"]
    n_prompt = len(tokenizer(format_generation_prompt(TEMPLATE, prompt))["input_ids"])
    labels = ids.clone()
    labels[:, :n_prompt] = -100  # transformers' own masked loss: mean NLL over the response tokens
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=labels).loss.item()
    assert count == ids.shape[1] - n_prompt
    assert -logprob / count == pytest.approx(loss, rel=1e-5)


def test_prompt_is_masked_out_and_count_is_response_plus_eos(tiny):
    model, tokenizer = tiny
    response = "Honestly, I love a good thunderstorm."
    pairs = [("Do you like storms?", response), ("What's your favorite kind of weather, and why?", response)]
    (first, first_count), (second, second_count) = response_logprobs(model, tokenizer, TEMPLATE, pairs,
                                                                     progress=False)
    assert first != pytest.approx(second, rel=1e-3)  # the response is scored *given* a different prompt
    assert first_count == second_count == n_tokens(tokenizer, response + tokenizer.eos_token)
    assert first < 0 and second < 0


def test_a_trailing_eos_in_the_response_is_counted_once(tiny):
    model, tokenizer = tiny
    plain, with_eos = response_logprobs(model, tokenizer, TEMPLATE, [("Hi?", "Hello!"),
                                                                     ("Hi?", "Hello!" + tokenizer.eos_token)],
                                        progress=False)
    assert plain[1] == with_eos[1] == n_tokens(tokenizer, "Hello!" + tokenizer.eos_token)
    assert plain[0] == pytest.approx(with_eos[0], rel=1e-5)


def test_a_token_across_the_prompt_boundary_falls_back_to_separate_tokenization(tiny, tmp_path, caplog):
    from helpers.local_models import build_tokenizer

    model, _ = tiny
    # A tokenizer that learned "\n\n" as one token: the prompt ends in "\n", so a response starting with "\n\n"
    # is tokenized with one token spanning the boundary.
    rows = [{**row, "chosen": "\n\n\n" + row["chosen"]} for row in read_local_rows(SAMPLE_DATASET)]
    (tmp_path / "newlines.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tokenizer = build_tokenizer(tmp_path / "newlines.jsonl")
    response = "\n\nSunny days, always."
    full = tokenizer(format_training_text(TEMPLATE, "Hi?", response, tokenizer.eos_token))["input_ids"]
    prompt = tokenizer(format_generation_prompt(TEMPLATE, "Hi?"))["input_ids"]
    assert full[:len(prompt)] != prompt  # the merge really happens
    with caplog.at_level(logging.INFO, logger="helpers.evaluation"):
        (logprob, count), = response_logprobs(model, tokenizer, TEMPLATE, [("Hi?", response)], progress=False)
    assert count == n_tokens(tokenizer, response + tokenizer.eos_token)
    assert math.isfinite(logprob) and logprob < 0
    assert "prompt/response boundary" in caplog.text


def test_max_length_keeps_the_start(tiny):
    model, tokenizer = tiny
    prompt, response = pairs_of(ROWS)[0]
    n_prompt = len(tokenizer(format_generation_prompt(TEMPLATE, prompt))["input_ids"])
    full, cut, none = (response_logprobs(model, tokenizer, TEMPLATE, [(prompt, response)], progress=False,
                                         max_length=max_length)[0] for max_length in (None, n_prompt + 3, n_prompt - 1))
    assert cut[1] == 3 and none == (0.0, 0)
    assert full[1] > 3 and full[0] < cut[0] < 0  # a prefix of the response: fewer (negative) terms in the sum


def test_training_mode_is_restored(tiny):
    model, tokenizer = tiny
    model.train()
    try:
        response_logprobs(model, tokenizer, TEMPLATE, pairs_of(ROWS[:2]), progress=False)
        assert model.training
    finally:
        model.eval()
    response_logprobs(model, tokenizer, TEMPLATE, pairs_of(ROWS[:2]), progress=False)
    assert not model.training


def test_half_precision_model_scores_close_to_float32(tiny):
    model, tokenizer = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    pairs = pairs_of(ROWS[:4])
    exact = response_logprobs(model, tokenizer, TEMPLATE, pairs, progress=False)
    approx = response_logprobs(half, tokenizer, TEMPLATE, pairs, progress=False)
    for (logprob, count), (logprob_half, count_half) in zip(exact, approx):
        assert count == count_half
        assert logprob_half == pytest.approx(logprob, rel=0.05)


# ---------------------------------------------------------------- loss, greedy continuation


def test_own_greedy_continuation_has_lower_loss_than_shuffled_or_random(tiny):
    model, tokenizer = tiny
    rng = random.Random(0)
    prompts = [row["prompt"] for row in ROWS[:4]]
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"  # one batched generate call; generation continues at the right edge
    inputs = left([format_generation_prompt(TEMPLATE, prompt) for prompt in prompts], return_tensors="pt",
                  padding=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    greedy, shuffled, uniform = [], [], []
    for new in output[:, inputs["input_ids"].shape[1]:].tolist():
        mixed = new[:]
        rng.shuffle(mixed)
        greedy.append(tokenizer.decode(new, skip_special_tokens=True))
        shuffled.append(tokenizer.decode(mixed, skip_special_tokens=True))
        uniform.append(tokenizer.decode([rng.randrange(10, len(tokenizer)) for _ in new], skip_special_tokens=True))
    own = score_responses(model, tokenizer, TEMPLATE, prompts, greedy, progress=False)
    for other in (shuffled, uniform):
        worse = score_responses(model, tokenizer, TEMPLATE, prompts, other, progress=False)
        assert own["loss"] < worse["loss"]
        assert own["perplexity"] < worse["perplexity"]
    assert own["perplexity"] == pytest.approx(math.exp(own["loss"]))
    assert own["n_rows"] == 4 and own["n_tokens"] > 4


def test_loss_summary_is_token_weighted():
    summary = loss_summary([(-6.0, 3), (-2.0, 1)])
    assert summary["loss"] == pytest.approx(2.0)  # 8 nats over 4 tokens, not the mean of row means (1.5)
    assert summary["perplexity"] == pytest.approx(math.exp(2.0))
    assert (summary["n_tokens"], summary["n_rows"]) == (4, 2)
    with pytest.raises(ValueError, match="no response tokens"):
        loss_summary([(0.0, 0)])


def test_score_responses_needs_matching_lengths(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(model, tokenizer, TEMPLATE, ["a", "b"], ["c"], progress=False)


# ---------------------------------------------------------------- preference metrics


def test_preference_metrics_on_hand_made_numbers():
    chosen = [(-2.0, 2), (-3.0, 3), (-4.0, 2), (-3.0, 3), (-5.0, 1)]  # per token: -1, -1, -2, -1, -5
    rejected = [(-4.0, 2), (-6.0, 2), (-2.0, 1), (-3.0, 2), (-2.0, 2)]  # per token: -2, -3, -2, -1.5, -1
    metrics = preference_metrics(chosen, rejected)  # margins: 1, 2, 0 (tie), 0.5, -4
    assert metrics["preference_accuracy"] == pytest.approx(3.5 / 5)
    assert metrics["mean_margin"] == pytest.approx(-0.5 / 5)
    assert (metrics["n_ties"], metrics["n_rows"], metrics["n_skipped"]) == (1, 5, 0)


def test_preference_metrics_skips_rows_without_tokens_and_checks_lengths():
    metrics = preference_metrics([(-1.0, 1), (0.0, 0)], [(-2.0, 1), (-1.0, 1)])
    assert (metrics["preference_accuracy"], metrics["n_rows"], metrics["n_skipped"]) == (1.0, 1, 1)
    with pytest.raises(ValueError, match="must pair up"):
        preference_metrics([(-1.0, 1)], [])
    with pytest.raises(ValueError, match="no rows to compare"):
        preference_metrics([(0.0, 0)], [(-1.0, 1)])


def test_swapping_chosen_and_rejected_mirrors_accuracy_and_margin(sample_scores):
    chosen, rejected = sample_scores
    forward, backward = preference_metrics(chosen, rejected), preference_metrics(rejected, chosen)
    assert forward["n_ties"] == backward["n_ties"] == 0
    assert 0 < forward["preference_accuracy"] < 1  # a random model: some rows each way
    assert backward["preference_accuracy"] == pytest.approx(1 - forward["preference_accuracy"])
    assert backward["mean_margin"] == pytest.approx(-forward["mean_margin"])


# ---------------------------------------------------------------- evaluate_model


def test_evaluate_model_without_rejected_field_gives_loss_and_a_note(tiny):
    model, tokenizer = tiny
    rows = [{"question": row["prompt"], "answer": row["chosen"]} for row in ROWS]
    result = evaluate_model(model, tokenizer, TEMPLATE, rows, "question", "answer", max_rows=5)
    assert result["n_rows"] == 5 and result["loss"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert "preference_accuracy" not in result and "mean_margin" not in result
    assert "no rejected_field" in result["note"]
    alone = score_responses(model, tokenizer, TEMPLATE, [r["question"] for r in rows[:5]],
                            [r["answer"] for r in rows[:5]], progress=False)
    assert result["loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_evaluate_model_with_a_rejected_column_missing_says_so(tiny):
    model, tokenizer = tiny
    rows = [{"prompt": row["prompt"], "chosen": row["chosen"]} for row in ROWS[:3]]
    result = evaluate_model(model, tokenizer, TEMPLATE, rows, "prompt", "chosen", rejected_field="rejected")
    assert "preference_accuracy" not in result
    assert "'rejected'" in result["note"] and "3 of 3 rows" in result["note"]


def test_evaluate_model_with_rejected_field_matches_its_parts(tiny, sample_scores):
    model, tokenizer = tiny
    result = evaluate_model(model, tokenizer, TEMPLATE, ROWS, "prompt", "chosen", rejected_field="rejected",
                            batch_size=4)
    chosen, rejected = sample_scores
    expected = preference_metrics(chosen, rejected)
    assert "note" not in result
    assert result["preference_accuracy"] == pytest.approx(expected["preference_accuracy"])
    # The margin is a difference of per-token means: its error scales with the means, not with the margin.
    scale = max(abs(logprob) / count for logprob, count in chosen + rejected)
    assert result["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-5 * scale)
    assert result["preference_rows"] == len(ROWS) and result["n_ties"] == 0
    assert result["loss"] == pytest.approx(loss_summary(chosen)["loss"], rel=1e-5)


def test_evaluate_model_checks_fields_before_scoring(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="response_field 'answer' is not a column"):
        evaluate_model(model, tokenizer, TEMPLATE, ROWS, "prompt", "answer")


# ---------------------------------------------------------------- compared runs


def test_compared_runs_in_folders_named_alike_are_kept_apart_by_path(tmp_path, monkeypatch):
    import contextlib

    from helpers import evaluation_report
    from helpers.config import RunConfig

    first, second = tmp_path / "a/run", tmp_path / "b/run"
    for run in (first, second):
        (run / "adapter").mkdir(parents=True)

    class AdapterModel:  # records which adapter each evaluation ran with
        active, paths = "default", {}

        def disable_adapter(self):
            return contextlib.nullcontext()

        def load_adapter(self, path, adapter_name):
            self.paths[adapter_name] = path

        def set_adapter(self, name):
            self.active = name

        def delete_adapter(self, name):
            del self.paths[name]

    monkeypatch.setattr(evaluation_report, "evaluate_model",
                        lambda model, tokenizer, **kwargs: {"adapter": model.paths.get(model.active, model.active)})
    config = RunConfig(run_dir=str(tmp_path / "run"), compare_runs=[str(first), str(second)])
    results = evaluation_report.evaluate_run(AdapterModel(), None, config, [])
    assert results["compared"] == {str(first): {"adapter": str(first / "adapter")},
                                   str(second): {"adapter": str(second / "adapter")}}
    assert results["run"] == str(tmp_path / "run")
    labels = [label for label, _ in evaluation_report._columns(results)]
    assert labels == ["base", "a/run", "b/run", f"{tmp_path.name}/run"]  # told apart in the table and the chart
    with pytest.raises(ValueError, match="names .*a/run' more than once"):
        evaluation_report.compared_runs(RunConfig(compare_runs=[str(first), str(first) + "/"]))


def test_scoring_batches_hold_at_most_the_token_budget_and_never_none():
    from helpers.evaluation import _batches

    lengths = [300, 200, 100, 100, 100, 50, 2000]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches = _batches(order, lengths, batch_size=4, batch_tokens=600)
    assert batches == [[6], [0, 1], [2, 3, 4, 5]]  # a row over the budget alone; padded to each batch's first row
    assert _batches(order, lengths, batch_size=2, batch_tokens=None) == [[6, 0], [1, 2], [3, 4], [5]]
