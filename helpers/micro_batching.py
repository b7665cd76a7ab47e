"""How an optimizer step's rows are computed (`micro_batching`): in how many micro-batches, and on a GPU where the
activations kept for the backward pass live and which attention kernel runs.

The recipe fixes the rows per optimizer step (per_device_train_batch_size x gradient_accumulation_steps, 2 x 4 in
the tutorial). `recipe` computes them as the tutorial does: its micro-batches, unsloth's gradient checkpointing
offloading each layer's input to the CPU, SDPA's default kernel. `auto` computes the same rows in fewer, larger
micro-batches where memory allows: as one micro-batch of 8 rows instead of 4 of 2. The optimization is the same:
the sampler's row order does not depend on the micro-batch size, so a step sees the same rows in the same order,
and transformers divides each micro-batch's summed token loss by the label tokens of the whole step
(`num_items_in_batch`, which unsloth's loss honours), so the step's gradient is the mean over its tokens either
way; only float rounding differs (tests/test_micro_batching.py measures it).

On a GPU, `auto` also keeps the checkpointed layer inputs on the GPU where they fit (gradient checkpointing without
the CPU offload: the same recomputation, without a copy out and back per layer) and runs attention without cuDNN's
SDPA kernel (flash where the GPU has it: cuDNN attention builds a plan per sequence length and costs ~0.2 ms of CPU
a call, and a padding-free micro-batch calls it once per row and layer). Both change where and how the same
numbers are computed, not which; on a fast GPU a step of ~2,000 tokens is bound by what the CPU spends per call,
which is what they cut (bench/speed.py measures each). With checkpoints on the GPU, `auto` also keeps decoder
layers un-checkpointed, per micro-batch, as many as the memory left by that micro-batch's length holds
(KeptLayers): their activations stay for the backward instead of being recomputed from the layer's input, which
saves that layer's second forward; the numbers computed are the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

log = logging.getLogger(__name__)

# GPU memory one token of a micro-batch takes in training, per unit of the model's hidden_size + intermediate_size
# (the activations of one decoder layer, recomputed under unsloth's offloaded gradient checkpointing). Measured on
# the H200 for the 8B shape (4096 + 14336) in 4-bit with fp16 (bench/results-h200-2026-11-29.json): one row of
# 8,192 tokens peaked at 7.95 GiB reserved, one of 32,768 at 14.47 GiB, i.e. 0.27 MiB a token; taken as 0.4 MiB
# (1.5x) for margin.
BYTES_PER_TOKEN_AND_WIDTH = 0.4 * 2**20 / (4096 + 14336)
# Kept on the GPU instead of offloaded, every layer's input stays for the backward pass: layers x hidden_size
# values of 2 bytes (fp16/bf16) a token, with the same 1.5x margin.
RESIDENT_MARGIN = 1.5
# Gradient and optimizer state per trainable parameter, at most: an fp32 gradient and two fp32 Adam moments.
BYTES_PER_TRAINABLE_PARAMETER = 12
# GPU memory a decoder layer kept un-checkpointed holds for the backward, per token and unit of hidden_size +
# intermediate_size. Measured on the H200 for the 8B shape (4096 + 14336) in 4-bit with fp16
# (bench/results-h200-2026-11-30-fast.json, key probe_4): with 24 of its 32 layers kept, a step whose largest
# micro-batch held 2,462 tokens peaked 5.91 GiB above the same step with every layer checkpointed, 107,400 bytes a
# token and layer (12 layers kept: 104,000).
KEPT_LAYER_BYTES_PER_TOKEN_AND_WIDTH = 107_400 / (4096 + 14336)
# GPU memory left unused by the layers kept: the allocator's fragmentation between micro-batches of other lengths,
# and what the cost per token measured on the first micro-batch does not foresee.
KEEP_MARGIN_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class MicroBatching:
    """How one process computes its rows per optimizer step."""

    rows: int  # rows per micro-batch (per_device_train_batch_size as it runs)
    accumulation: int  # micro-batches per optimizer step
    resident_checkpoints: bool = False  # checkpointed layer inputs kept on the GPU (else offloaded to the CPU)
    flash_attention: bool = False  # SDPA without its cuDNN kernel during training
    keep_layers: bool = False  # per micro-batch, decoder layers kept un-checkpointed where they fit (KeptLayers)

    @property
    def gradient_checkpointing(self) -> bool | str:
        """use_gradient_checkpointing for unsloth: True keeps checkpoints on the GPU, "unsloth" offloads them."""
        return True if self.resident_checkpoints else "unsloth"

    def record(self) -> dict:
        """What run.json's `distributed` says of it."""
        return {"per_device_train_batch_size": self.rows, "gradient_accumulation_steps": self.accumulation,
                "use_gradient_checkpointing": self.gradient_checkpointing,
                "attention": "SDPA without cuDNN" if self.flash_attention else "default",
                "layers_kept_un_checkpointed": "as many as fit, per micro-batch" if self.keep_layers else "none"}


def micro_batch_rows(step_rows: int, recipe_rows: int, row_tokens: int, token_budget: int | None) -> int:
    """The largest divisor of step_rows whose micro-batch of row_tokens-token rows fits token_budget (None: no
    limit), and never fewer than the recipe's rows."""
    fitting = [rows for rows in range(1, step_rows + 1)
               if step_rows % rows == 0 and (token_budget is None or rows * row_tokens <= token_budget)]
    return max([recipe_rows, *fitting])


def lora_parameters(model, config) -> int:
    """How many parameters LoRA adds to the model's target modules: r x (in + out) each."""
    targets = set(config.target_modules)
    return sum(config.lora_r * (module.in_features + module.out_features) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"))


def gpu_cap_bytes(config) -> float:
    """The GPU memory training may use: max_gpu_memory_gib, or the card's memory where that is 0 or more."""
    from helpers.environment import gpu_total_gib

    return min(config.max_gpu_memory_gib or gpu_total_gib(), gpu_total_gib()) * 2**30


def free_gpu_bytes(model, config) -> float | None:
    """GPU memory left for activations beside the loaded model and its adapter's gradient and optimizer state,
    under gpu_cap_bytes; None on the CPU (no limit)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return (gpu_cap_bytes(config) - torch.cuda.memory_allocated()
            - lora_parameters(model, config) * BYTES_PER_TRAINABLE_PARAMETER)


def decide(config, per_device: int, accumulation: int, model, longest_row: int) -> MicroBatching:
    """How to compute one process's per_device x accumulation rows per optimizer step as config.micro_batching
    asks, decided after the base model loads and before LoRA is added (the checkpointing mode goes with it).
    longest_row: tokens of the longest training row (at most max_seq_length); a micro-batch of n rows is taken to
    hold n of them, its worst case."""
    if config.micro_batching == "recipe":
        return MicroBatching(per_device, accumulation)
    step_rows = per_device * accumulation
    free = free_gpu_bytes(model, config)
    if free is None:  # the CPU: no memory limit, nothing offloaded, no cuDNN
        rows = micro_batch_rows(step_rows, per_device, longest_row, None)
        chosen = MicroBatching(rows, step_rows // rows)
    else:
        text_config = model.config.get_text_config()
        per_token = BYTES_PER_TOKEN_AND_WIDTH * (text_config.hidden_size + text_config.intermediate_size)
        resident = RESIDENT_MARGIN * text_config.num_hidden_layers * text_config.hidden_size * 2
        rows = micro_batch_rows(step_rows, per_device, longest_row, max(0, int(free / per_token)))
        resident_checkpoints = rows * longest_row * (per_token + resident) <= free
        chosen = MicroBatching(rows, step_rows // rows, resident_checkpoints=resident_checkpoints, flash_attention=True,
                      keep_layers=resident_checkpoints)
    log.info("micro_batching='auto': %d rows per step as %d x %d (recipe %d x %d; longest row %d tokens; "
             "GPU memory free for activations %s): %s", step_rows, chosen.rows, chosen.accumulation, per_device,
             accumulation, longest_row, "unlimited" if free is None else f"{free / 2**30:.1f} GiB", chosen.record())
    return chosen


def decoder_layers(model) -> list:
    """The model's layers that gradient checkpointing can leave out one by one (transformers'
    GradientCheckpointingLayer: each decoder layer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class KeptLayers:
    """Per training micro-batch, how many decoder layers run without gradient checkpointing: their activations stay
    on the GPU for the backward instead of being recomputed from the layer's input. As many as fit: the memory
    limit, less a margin, what is allocated when the micro-batch starts, the trainable parameters' gradients and
    what the micro-batch takes besides kept layers (measured on the first one, which keeps none), over a kept layer's
    cost (KEPT_LAYER_BYTES_PER_TOKEN_AND_WIDTH) at the micro-batch's length. Installed as a forward pre-hook of the
    model; `counts` holds each training micro-batch's number, and `calls` what ran: each kept layer's forward calls
    in that micro-batch, backward included (1 where keeping took effect, 2 where the layer was recomputed)."""

    def __init__(self, layers: list, limit, allocated, peak, gradient_bytes: int, layer_bytes_per_token: float):
        self.layers = layers  # the model's decoder layers; from the first training micro-batch, those checkpointed
        self.armed = False  # layers narrowed to those the trainer left checkpointing (it arms them when it starts)
        self.limit, self.allocated, self.peak = limit, allocated, peak  # () -> bytes
        self.gradient_bytes = gradient_bytes
        self.layer_bytes_per_token = layer_bytes_per_token
        self.other_bytes_per_token: float | None = None  # learned from the first micro-batch
        self.first: tuple[int, int] | None = None  # (tokens, allocated at its start) of the first micro-batch
        self.counts: list[int] = []
        self.calls: list[list[int]] = []
        self.handle = None
        self.layer_handles: list = []

    @classmethod
    def install(cls, model, config) -> KeptLayers | None:
        """A KeptLayers for model on its CUDA GPU (None where gradient checkpointing has no layers to leave out,
        and in a multi-process run, whose processes could decide differently), hooked into its forward."""
        import torch

        layers = decoder_layers(model)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if not layers or distributed or not torch.cuda.is_available():
            return None
        cap = gpu_cap_bytes(config)

        def limit() -> float:  # the cap, or less where the GPU holds memory outside PyTorch (CUDA context, others)
            return min(cap, torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())

        text_config = model.config.get_text_config()
        keeper = cls(layers, limit, torch.cuda.memory_allocated, torch.cuda.max_memory_allocated,
                     sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                     KEPT_LAYER_BYTES_PER_TOKEN_AND_WIDTH * (text_config.hidden_size + text_config.intermediate_size))
        keeper.handle = model.register_forward_pre_hook(keeper.before_forward, with_kwargs=True)
        return keeper

    def count(self, tokens: int, allocated: float) -> int:
        """Layers to keep for a micro-batch of tokens positions starting with allocated bytes in use."""
        if self.other_bytes_per_token is None:
            return 0
        room = (self.limit() - KEEP_MARGIN_BYTES - allocated - self.gradient_bytes
                - tokens * self.other_bytes_per_token)
        return max(0, min(len(self.layers), int(room // (tokens * self.layer_bytes_per_token))))

    def before_forward(self, module, args, kwargs) -> None:
        """The hook: set each layer's gradient checkpointing for the micro-batch about to run (training only)."""
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if not module.training or not torch.is_grad_enabled() or ids is None:
            return
        if not self.armed:
            self.layers, self.armed = [layer for layer in self.layers if layer.gradient_checkpointing], True
            self.layer_handles = [layer.register_forward_pre_hook(functools.partial(self.layer_ran, index))
                                  for index, layer in enumerate(self.layers)]
            log.info("micro_batching='auto': of %d decoder layers checkpointed, as many as fit kept un-checkpointed "
                     "per micro-batch from the second", len(self.layers))
        tokens = ids.shape[0] * ids.shape[1]
        if self.first is not None and self.other_bytes_per_token is None:  # the first micro-batch has run
            first_tokens, started = self.first
            used = self.peak() - started - self.gradient_bytes
            self.other_bytes_per_token = max(0.0, used / first_tokens)
        allocated = self.allocated()
        if self.first is None:
            self.first = (tokens, allocated)
        kept = self.count(tokens, allocated)
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = index >= kept
        self.counts.append(kept)
        self.calls.append([0] * kept)

    def layer_ran(self, index: int, module, args) -> None:
        """A decoder layer's hook: count a training forward of a layer kept for this micro-batch (its recompute
        in the backward, if it was not kept after all, counts too)."""
        import torch

        if self.calls and index < len(self.calls[-1]) and module.training and torch.is_grad_enabled():
            self.calls[-1][index] += 1

    def remove(self) -> None:
        """Unhook; every layer that was checkpointed checkpointed again. Warns where a kept layer was recomputed."""
        self.handle.remove()
        for handle in self.layer_handles:
            handle.remove()
        for layer in self.layers if self.armed else []:
            layer.gradient_checkpointing = True
        recomputed = sum(calls > 1 for micro_batch in self.calls for calls in micro_batch)
        if recomputed:
            log.warning("micro_batching='auto': %d of %d kept layer passes ran twice (recomputed in the backward): "
                        "keeping them un-checkpointed had no effect there", recomputed, sum(self.counts))

    def record(self) -> dict:
        """What run.json's `distributed` says of the layers kept per micro-batch: how many were asked to skip
        checkpointing (min, mean, max), how many ran their forward once (ran_once), and a kept layer's mean
        forward calls per micro-batch (1.0 when keeping always took effect)."""
        counts = self.counts or [0]
        once = [sum(calls == 1 for calls in micro_batch) for micro_batch in self.calls] or [0]
        calls = [calls for micro_batch in self.calls for calls in micro_batch]
        return {"layers": len(self.layers), "micro_batches": len(self.counts), "min": min(counts),
                "mean": round(sum(counts) / len(counts), 1), "max": max(counts),
                "ran_once": {"min": min(once), "mean": round(sum(once) / len(once), 1), "max": max(once)},
                "forward_calls_per_kept_layer": round(sum(calls) / len(calls), 2) if calls else None}


@contextlib.contextmanager
def training(chosen: MicroBatching, model, config):
    """Training computed as the plan says: its attention kernels and, with keep_layers, the decoder layers kept
    un-checkpointed per micro-batch. Yields the KeptLayers in effect, or None."""
    keeper = KeptLayers.install(model, config) if chosen.keep_layers else None
    try:
        with attention(chosen):
            yield keeper
    finally:
        if keeper is not None:
            keeper.remove()


@contextlib.contextmanager
def attention(chosen: MicroBatching):
    """Training's attention kernels as the plan says: SDPA without cuDNN attention (flash, memory-efficient or
    math, as SDPA picks among them) when flash_attention is set."""
    if not chosen.flash_attention:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
