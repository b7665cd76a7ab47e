"""How an optimizer step's rows are cut into micro-batches (`micro_batching`).

The recipe fixes the rows per optimizer step (per_device_train_batch_size x gradient_accumulation_steps, 2 x 4 in
the tutorial). `recipe` computes them as the recipe says; `auto` computes the same rows in fewer, larger
micro-batches where memory allows: as one micro-batch of 8 rows instead of 4 of 2. The optimization is the same:
the sampler's row order does not depend on the micro-batch size, so a step sees the same rows in the same order,
and transformers divides each micro-batch's summed token loss by the label tokens of the whole step
(`num_items_in_batch`, which unsloth's loss honours), so the step's gradient is the mean over its tokens either
way; only float rounding differs (tests/test_micro_batching.py measures it).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# GPU memory one token of a micro-batch takes in training, per unit of the model's hidden_size + intermediate_size
# (the activations of one decoder layer, recomputed under unsloth's offloaded gradient checkpointing). Measured on
# the H200 for the 8B shape (4096 + 14336) in 4-bit with fp16 (bench/results-h200-2026-11-29.json): one row of
# 8,192 tokens peaked at 7.95 GiB reserved, one of 32,768 at 14.47 GiB, i.e. 0.27 MiB a token; taken as 0.4 MiB
# (1.5x) for margin. With rows x max_seq_length as the micro-batch's tokens (the worst case), the 8B recipe's 8 rows
# of up to 2,048 tokens fit a T4's 15 GiB as one micro-batch.
BYTES_PER_TOKEN_AND_WIDTH = 0.4 * 2**20 / (4096 + 14336)
# Gradient and optimizer state per trainable parameter, at most: an fp32 gradient and two fp32 Adam moments.
BYTES_PER_TRAINABLE_PARAMETER = 12


def micro_batch_rows(step_rows: int, recipe_rows: int, max_seq_length: int, token_budget: int | None) -> int:
    """The largest divisor of step_rows whose micro-batch of max_seq_length-token rows fits token_budget (None: no
    limit), and never fewer than the recipe's rows."""
    fitting = [rows for rows in range(1, step_rows + 1)
               if step_rows % rows == 0 and (token_budget is None or rows * max_seq_length <= token_budget)]
    return max([recipe_rows, *fitting])


def token_budget(model, max_gpu_memory_gib: float) -> int | None:
    """How many tokens one micro-batch may hold on this GPU beside the loaded model with its adapter, their
    gradients and optimizer state, under the memory cap (0: the whole card); None on the CPU (no limit)."""
    import torch

    from helpers.environment import gpu_total_gib

    if not torch.cuda.is_available():
        return None
    cap = min(max_gpu_memory_gib or gpu_total_gib(), gpu_total_gib()) * 2**30
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    free = cap - torch.cuda.memory_allocated() - trainable * BYTES_PER_TRAINABLE_PARAMETER
    text_config = model.config.get_text_config()
    per_token = BYTES_PER_TOKEN_AND_WIDTH * (text_config.hidden_size + text_config.intermediate_size)
    return max(0, int(free / per_token))


def micro_batches(config, per_device: int, accumulation: int, model) -> tuple[int, int]:
    """(micro-batch rows, accumulation steps) computing one process's per_device x accumulation rows per optimizer
    step as config.micro_batching asks."""
    if config.micro_batching == "recipe":
        return per_device, accumulation
    step_rows = per_device * accumulation
    budget = token_budget(model, config.max_gpu_memory_gib)
    rows = micro_batch_rows(step_rows, per_device, config.max_seq_length, budget)
    log.info("micro_batching='auto': %d rows per step as %d x %d (recipe %d x %d; token budget %s)", step_rows,
             rows, step_rows // rows, per_device, accumulation, "none" if budget is None else f"{budget:,}")
    return rows, step_rows // rows
