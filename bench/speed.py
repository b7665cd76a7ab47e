"""Training speed and memory of the recipe on a CUDA machine, each configuration in its own process: the tutorial's
settings, the kit's fast default (micro_batching="auto": the same 8 rows per optimizer step in one micro-batch),
rows packed into 8,192-token sequences, and plain transformers + peft + bitsandbytes at the tutorial's settings;
then the longest single row that trains under the memory cap. Every process runs under the cap (15 GiB, a T4's
memory). Prints a table and writes JSON (rewritten after each configuration, so a run cut short keeps what it
measured).

Rows are synthetic token ids as long as rows shaped like the Human-Like-DPO data (bench/real_shaped_data.py) in the
tutorial's Alpaca template, counted with the model's tokenizer (the stand-in's is Llama 3's: a median of about 270
tokens, a mean of 340, 1,727 at most; until 2026-12-06 a log-normal guess with median 240, clipped to 90-700, was
used). Random weights: the loss only has to stay finite.

    python bench/speed.py --model /dev/shm/llama8b --out bench.json   # the 8B shape, 4-bit, fp16, on a GPU
    python bench/speed.py --smoke --out /tmp/smoke.json               # the tiny model on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # real_shaped_data
PARAMS_8B = 8.03e9
PEAK_FLOPS = 790e12  # H200 dense bf16/fp16 tensor throughput reachable in practice
CONFIGS = {
    # name: backend, the recipe's micro-batch rows and accumulation, micro_batching, packing, max_length
    "tutorial": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="recipe", packing=False,
                     max_length=2048),
    "fast": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                 max_length=2048),  # the kit's default: the tutorial's 8 rows per step, as few micro-batches as fit
    # opt-in: rows packed into long sequences (more rows per step), planned as the kit plans packing=True by default
    "packed-8k": dict(backend="unsloth", batch=1, accumulation=8, micro_batching="auto", packing=True,
                      max_length=8192),
    "hf-tutorial": dict(backend="hf", batch=2, accumulation=4, micro_batching="recipe", packing=False,
                        max_length=2048),  # plain transformers + peft + bitsandbytes, tutorial's settings
    # Opt-in (--configs): the fast default without parts of it. Its micro-batches with the tutorial's computation
    # (checkpoints offloaded to the CPU, SDPA's default kernel: cuDNN attention on an H100/H200), and padded
    # micro-batches instead of padding-free.
    "fast-offloaded": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                           max_length=2048, plan=dict(resident_checkpoints=False, flash_attention=False)),
    "fast-padded": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                        max_length=2048, padding_free=False),
    # the fast default with cuDNN attention switched off for the whole process, before the model loads, instead of
    # around training alone
    "fast-no-cudnn-at-load": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                                  max_length=2048, no_cudnn_at_load=True),
    # the fast default with unsloth's attention for padding-free rows as one SDPA call a layer over a block-diagonal
    # mask, instead of one call per run of equal row lengths (its UNSLOTH_SDPA_PACKED_SEGMENTS switch)
    "fast-one-sdpa": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                          max_length=2048, environment={"UNSLOTH_SDPA_PACKED_SEGMENTS": "0"}),
    # padded micro-batches without unsloth's per-decoder-layer torch.compile (which padding-free batches skip)
    "fast-padded-eager": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                              max_length=2048, padding_free=False, environment={"UNSLOTH_BLOCK_COMPILE": "0"}),
    # the fast default with every decoder layer checkpointed (none kept: helpers.micro_batching.KeptLayers off)
    "fast-all-checkpointed": dict(backend="unsloth", batch=2, accumulation=4, micro_batching="auto", packing=False,
                                  max_length=2048, plan=dict(keep_layers=False)),
}
DEFAULT_CONFIGS = ["tutorial", "fast", "packed-8k", "hf-tutorial"]
# Longest-row search: lengths tried in order until one runs out of memory, with unsloth's tiled MLP (its
# long-context option: the MLP's activations computed in tiles) on top of its offloaded gradient checkpointing.
# Without the tiled MLP, 32,768 trained and 40,960 ran out of memory (2026-11-29).
LONGEST = [32768, 40960, 49152, 57344, 65536, 81920]


def row_lengths(n: int, tokenizer, max_length: int) -> list[int]:
    """Token lengths (at most max_length) of n rows shaped like the real data in the Alpaca template."""
    from real_shaped_data import make_rows

    from helpers.prompts import format_training_text

    texts = [format_training_text("alpaca", row["prompt"], row["chosen"], tokenizer.eos_token, tokenizer)
             for row in make_rows(n)]
    return [min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"]]


def synthetic_dataset(lengths: list[int], vocab: int, eos: int):
    """Pre-tokenized rows of these lengths (trl skips tokenization when input_ids are given)."""
    import random

    from datasets import Dataset

    rng = random.Random(1)
    return Dataset.from_dict({"input_ids": [[rng.randrange(10, vocab) for _ in range(k - 1)] + [eos]
                                            for k in lengths]})


def load_base(model_path: str, max_length: int, precision: str, four_bit: bool, tiled_mlp: bool = False):
    """The base model through unsloth (4-bit on the GPU) and its tokenizer."""
    import torch

    from helpers.stack import FastLanguageModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    return FastLanguageModel.from_pretrained(model_path, max_seq_length=max_length, dtype=dtype, load_in_4bit=four_bit,
                                             unsloth_tiled_mlp=tiled_mlp)


def load_hf(model_path: str, precision: str, four_bit: bool):
    """Plain transformers + peft + bitsandbytes: the model with LoRA r=64 on the seven projections, its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from helpers.config import SEVEN_PROJECTIONS

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    quant = None
    if four_bit:  # the 4-bit layers compute in the training precision, so no bf16 part is left under fp16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 **({"device_map": {"": 0}} if torch.cuda.is_available() else {}))
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=list(SEVEN_PROJECTIONS), task_type="CAUSAL_LM"))
    return model, AutoTokenizer.from_pretrained(model_path)


def trainable_to_fp32(model) -> None:
    """The QLoRA recipe under fp16: trainable weights in fp32, so the fp16 grad scaler can unscale their gradients.
    trl's SFTTrainer casts a quantized model's adapter weights to bf16 when it is built, so this runs after."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def worker(name: str, model_path: str, steps: int, warmup: int, precision: str, cap_gib: float, four_bit: bool,
           run_dir: str, profile_dir: str | None = None) -> dict:
    """Train one configuration for warmup + steps optimizer steps under the memory cap; measure after the warm-up.
    With profile_dir, two more steps run under torch.profiler after the measured ones (see profiled)."""
    spec = CONFIGS[name]
    if spec["backend"] == "unsloth":
        import helpers.stack  # noqa: F401  (before trl)
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from helpers import micro_batching
    from helpers.config import RunConfig
    from helpers.environment import cap_gpu_memory, peak_memory

    cuda = torch.cuda.is_available()
    cap_gpu_memory(cap_gib)
    total = warmup + steps + (2 if profile_dir else 0)  # profiled steps come after the measured ones
    rows = spec["batch"] * spec["accumulation"] * total
    if spec["packing"]:  # enough rows to fill every packed sequence, with room to spare (rows of ~340 tokens)
        rows = math.ceil(rows * spec["max_length"] / 340 * 1.3)
    if spec.get("no_cudnn_at_load"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if spec["backend"] == "unsloth":  # as the kit does: the plan between the base model's load and LoRA
        from helpers.modeling import add_lora

        model, tokenizer = load_base(model_path, spec["max_length"], precision, four_bit)
        lengths = row_lengths(rows, tokenizer, spec["max_length"])
        kit = RunConfig(max_seq_length=spec["max_length"], max_gpu_memory_gib=cap_gib,
                        micro_batching=spec["micro_batching"])  # the tutorial's LoRA: r 64 on the seven projections
        computed = micro_batching.decide(kit, spec["batch"], spec["accumulation"], model,  # packed rows: max_length long
                                 spec["max_length"] if spec["packing"] else max(lengths))
        computed = dataclasses.replace(computed, **spec.get("plan", {}))
        model = add_lora(model, kit, computed.gradient_checkpointing)
    else:
        model, tokenizer = load_hf(model_path, precision, four_bit)
        lengths = row_lengths(rows, tokenizer, spec["max_length"])
        computed = micro_batching.MicroBatching(spec["batch"], spec["accumulation"])
    batch, accumulation = computed.rows, computed.accumulation
    marks: dict[str, list[float]] = {"step_end": [], "pre_optimizer": [], "optimizer": []}
    tokens: list[int] = []

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Clock(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            marks["pre_optimizer"].append(now())

        def on_optimizer_step(self, args, state, control, **kwargs):
            marks["optimizer"].append(now())

        def on_step_end(self, args, state, control, **kwargs):
            marks["step_end"].append(now())
            tokens.append(state.num_input_tokens_seen)

    args = SFTConfig(output_dir=run_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     max_steps=total, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=2,
                     optim="adamw_8bit", logging_steps=1, fp16=precision == "fp16", bf16=precision == "bf16",
                     packing=spec["packing"], max_length=spec["max_length"], save_strategy="no", report_to="none",
                     include_num_input_tokens_seen="non_padding", seed=3407, dataset_num_proc=1,
                     **({"padding_free": spec["padding_free"]} if "padding_free" in spec else {}))
    callbacks = [Clock()] + ([profiled(model, warmup + steps, Path(profile_dir) / name)] if profile_dir else [])
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args, callbacks=callbacks,
                         train_dataset=synthetic_dataset(lengths, min(tokenizer.vocab_size, 1000), tokenizer.eos_token_id))
    if spec["backend"] == "hf" and precision == "fp16":
        trainable_to_fp32(trainer.model)
    collate, positions = trainer.data_collator, [0, 0]  # all positions, the largest micro-batch's

    def counting_collator(examples):  # every position the model computes, padding included
        batch_out = collate(examples)
        positions[0] += batch_out["input_ids"].numel()
        positions[1] = max(positions[1], batch_out["input_ids"].numel())
        return batch_out

    trainer.data_collator = counting_collator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with micro_batching.training(computed, model, kit if spec["backend"] == "unsloth" else None) as kept:
        trainer.train()
    measured, last = steps, warmup + steps - 1
    t0, t1 = marks["step_end"][warmup - 1], marks["step_end"][last]
    n0, n1 = tokens[warmup - 1], tokens[last]
    optimizer_s = [b - a for a, b in zip(marks["pre_optimizer"][warmup:last + 1], marks["optimizer"][warmup:last + 1])]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    peaks = peak_memory()
    return {"config": name, "backend": spec["backend"], "micro_batching": spec["micro_batching"],
            "gradient_checkpointing": ("transformers' (on the GPU)" if spec["backend"] == "hf" else
                                       "on the GPU" if computed.resident_checkpoints else "offloaded to the CPU")
            + (f", {kept.record()['mean']} of {len(kept.layers)} layers kept (mean)" if kept else ""),
            "attention": computed.record()["attention"],
            "layers_kept_un_checkpointed": kept.record() if kept else None,
            "recipe_batch": f"{spec['batch']} x {spec['accumulation']}", "micro_batch_rows": batch,
            "accumulation": accumulation, "packing": spec["packing"], "max_length": spec["max_length"],
            "padding_free": bool(getattr(trainer.args, "padding_free", False)),
            "padding_share": round(1 - tokens[-1] / positions[0], 4) if positions[0] else None,
            "precision": precision, "cap_gib": cap_gib, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "tokens_per_s": round(tokens_per_s, 1), "s_per_step": round((t1 - t0) / measured, 3),
            "each_s_per_step": [round(b - a, 3) for a, b in zip(marks["step_end"][warmup - 1:last],
                                                                 marks["step_end"][warmup:last + 1])],
            "optimizer_s_per_step": round(sum(optimizer_s) / len(optimizer_s), 4),
            "tokens_per_step": round((n1 - n0) / measured),
            "largest_micro_batch_tokens": positions[1],
            "mfu": round(tokens_per_s * 6 * PARAMS_8B / PEAK_FLOPS, 4),
            "peak_allocated_gib": peaks.get("peak_gpu_allocated_gib"), "peak_reserved_gib": peaks.get(
                "peak_gpu_reserved_gib"), "final_loss": losses[-1], "loss_finite": all(math.isfinite(x) for x in losses)}


def profiled(model, first: int, out: Path):
    """A trainer callback: torch.profiler over optimizer steps first+1 and first+2 (the model's forward marked
    "model_forward"), written to OUT.json (profiled wall time and GPU kernel time per step) and two tables,
    OUT-device.txt (ops by GPU time) and OUT-cpu.txt (by CPU time: forward, backward, optimizer)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    forward = model.forward

    def marked_forward(*args, **kwargs):
        with torch.profiler.record_function("model_forward"):
            return forward(*args, **kwargs)

    model.forward = marked_forward

    def synchronized() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Profiled(TrainerCallback):
        profiler, started = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                      if cuda else [])
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.started = synchronized()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step != first + 2:
                return
            wall = synchronized() - self.started
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            kernel_s = sum(e.self_device_time_total for e in events) / 1e6
            out.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{out}-device.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=45))
            Path(f"{out}-cpu.txt").write_text(events.table(sort_by="cpu_time_total", row_limit=45))
            Path(f"{out}.json").write_text(json.dumps({"wall_s_per_step": round(wall / 2, 4),
                                                       "gpu_kernel_s_per_step": round(kernel_s / 2, 4),
                                                       "gpu_busy": round(kernel_s / wall, 3)}))
            self.profiler = None

    return Profiled()


LONGEST_MODES = {
    # name: unsloth's tiled MLP (the MLP's activations computed in tiles), extra environment
    "plain": (False, {}),
    "tiled": (True, {}),
    # unsloth's RMSNorm keeps its output for its backward, so the LoRA MLP does not write its input gradient into
    # that tensor (which the tiled MLP's backward hands it as a view)
    "tiled-saved-norm": (True, {"UNSLOTH_RMSNORM_SAVE_OUTPUT": "1"}),
    # unsloth's tiled MLP with its backward replaced by tiled_mlp_backward (below): measures what the tiled MLP
    # would give where unsloth's own backward fails
    "tiled-patched": (True, {}),
}


def tiled_mlp_backward(ctx, grad_output, *args):
    """unsloth_zoo's TiledMLP.backward (2026.10.9) without its views of the saved input made in no-grad mode: each
    shard is recomputed from a copy of its rows (a leaf of its own) and its input gradient copied into place."""
    import torch

    x, = ctx.saved_tensors
    hidden = x.shape[-1]
    rows, grad_rows = x.reshape(-1, hidden), grad_output.reshape(-1, hidden)
    x_grad = torch.empty_like(rows)
    start = 0
    for size in ctx.split_sizes:
        shard = rows[start:start + size].detach().clone().unsqueeze(0).requires_grad_(True)
        with torch.enable_grad():
            out = ctx.mlp_forward(shard)
        torch.autograd.backward(out, grad_rows[start:start + size].unsqueeze(0))
        x_grad[start:start + size].copy_(shard.grad[0])
        start += size
    return None, None, x_grad.view_as(x), None, None, None


def longest_sequence(model_path: str, cap_gib: float, lengths: list[int], precision: str, four_bit: bool, mode: str,
                     out: Path) -> dict:
    """The longest single row that trains (forward + backward) under cap_gib, lengths tried in order until one runs
    out of memory or fails; the result is rewritten to out after every length (a timeout keeps what was found)."""
    tiled, environment = LONGEST_MODES[mode]
    os.environ.update(environment)
    import helpers.stack  # noqa: F401
    import torch

    if mode == "tiled-patched":
        from unsloth_zoo import tiled_mlp

        tiled_mlp.TiledMLP.backward = staticmethod(tiled_mlp.torch_amp_custom_bwd(tiled_mlp_backward))

    from helpers.config import RunConfig
    from helpers.environment import cap_gpu_memory
    from helpers.modeling import add_lora

    cuda = torch.cuda.is_available()
    cap_gpu_memory(cap_gib)
    model = add_lora(load_base(model_path, max(lengths), precision, four_bit, tiled_mlp=tiled)[0],
                     RunConfig(max_seq_length=max(lengths)))
    model.train()
    device, dtype = ("cuda", torch.float16 if precision == "fp16" else torch.bfloat16) if cuda else ("cpu", None)
    result = {"job": f"longest:{mode}", "mode": mode, "cap_gib": cap_gib, "precision": precision, "tiled_mlp": tiled,
              "environment": environment, "tried_peak_reserved_gib": {}, "seconds": {}, "longest_tokens": 0}
    for length in lengths:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(10, 1000, (1, length), device=device)
        started = time.perf_counter()
        loss = None
        try:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            result["tried_peak_reserved_gib"][length] = None
            break
        except RuntimeError as error:  # not memory: a failure of this mode, said in the table
            result["failure"] = f"{length} tokens: {type(error).__name__}: {str(error)[:400]}"
            break
        finally:
            loss = None
        result["tried_peak_reserved_gib"][length] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else 0.0
        result["seconds"][length] = round(time.perf_counter() - started, 1)
        result["longest_tokens"] = length
        out.write_text(json.dumps(result))
        print(f"length {length}: {result['tried_peak_reserved_gib'][length]} GiB reserved, "
              f"{result['seconds'][length]} s", flush=True)
    return result


def table(results: list[dict]) -> str:
    """The results as a Markdown table (ratio to the tutorial's tokens/s), the longest row and any failures."""
    base = next((r["tokens_per_s"] for r in results if r.get("config") == "tutorial"), None)
    lines = ["| configuration | micro-batch | checkpoints | attention | tokens/s | x tutorial | s/step | "
             "optimizer s/step | tokens/step | padding | MFU | peak reserved GiB | loss finite |", "|---" * 13 + "|"]
    for r in results:
        if "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
            padding = "free" if r["padding_free"] else f"{r['padding_share']:.0%}"
            lines.append(f"| {r['config']} | {r['micro_batch_rows']} x {r['accumulation']} | "
                         f"{r.get('gradient_checkpointing', '-')} | {r.get('attention', '-')} | "
                         f"{r['tokens_per_s']:,.0f} | "
                         f"{ratio} | {r['s_per_step']} | {r['optimizer_s_per_step']} | {r['tokens_per_step']:,} | "
                         f"{padding} | {r['mfu']:.1%} | {r['peak_reserved_gib']} | {r['loss_finite']} |")
    for r in results:
        if "longest_tokens" in r:
            lines.append(f"\nlongest row under {r['cap_gib']} GiB ({r['precision']}, {r['mode']}): "
                         f"{r['longest_tokens']:,} tokens; peak reserved GiB by length (None: out of memory) "
                         f"{r['tried_peak_reserved_gib']}" + (f"; failed at {r['failure']}" if "failure" in r else ""))
        elif "error" in r:
            lines.append(f"\n{r['job']} failed:\n{r['error']}")
    return "\n".join(lines)


def medians(results: list[dict]) -> dict[str, dict]:
    """Per configuration run more than once: the median, least and most tokens/s of its runs, the ratio of its median
    to the tutorial's, and the layers kept (the mean of each run's count of what ran)."""
    import statistics

    runs: dict[str, list[dict]] = {}
    for result in results:
        if "tokens_per_s" in result:
            runs.setdefault(result["config"], []).append(result)
    summary = {name: {"runs": len(rs), "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "least": min(r["tokens_per_s"] for r in rs), "most": max(r["tokens_per_s"] for r in rs),
                      "peak_reserved_gib": max(r["peak_reserved_gib"] or 0 for r in rs),
                      "layers_kept": [r["layers_kept_un_checkpointed"] for r in rs if r["layers_kept_un_checkpointed"]]}
               for name, rs in runs.items()}
    base = summary.get("tutorial", {}).get("median_tokens_per_s")
    for entry in summary.values():
        entry["x_tutorial_median"] = round(entry["median_tokens_per_s"] / base, 2) if base else None
    return summary


def medians_table(results: list[dict]) -> str:
    """medians() as a Markdown table."""
    lines = ["| configuration | runs | median tokens/s | least - most | x tutorial (medians) | peak reserved GiB |",
             "|---" * 6 + "|"]
    for name, m in medians(results).items():
        lines.append(f"| {name} | {m['runs']} | {m['median_tokens_per_s']:,.0f} | {m['least']:,.0f} - "
                     f"{m['most']:,.0f} | {m['x_tutorial_median']} | {m['peak_reserved_gib']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (the 8B stand-in: python bench/standin.py DIR)")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before measuring")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--cap-gib", type=float, default=15.0, help="GPU memory cap of every process (a T4's 15)")
    parser.add_argument("--longest", nargs="*", type=int, default=LONGEST, help="lengths to try; none to skip")
    parser.add_argument("--longest-modes", nargs="+", default=["tiled-saved-norm"], choices=list(LONGEST_MODES),
                        help="how the longest row is computed, each in its own process (see LONGEST_MODES)")
    parser.add_argument("--profile", metavar="DIR", help="also profile two more steps of each configuration "
                                                         "(torch.profiler tables into DIR)")
    parser.add_argument("--job-timeout", type=float, default=None, help="seconds one process may take; a longest-row "
                                                                        "search cut short keeps the lengths it ran")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, fp32, few steps: checks "
                                                             "the script end to end without a GPU")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every configuration, interleaved (A B C A B C "
                                                                 "...), each in its own process; medians reported")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        from helpers.local_models import build_tiny_model

        args.model = args.model or str(build_tiny_model(Path(tempfile.gettempdir()) / "bench-tiny-llama"))
        args.precision, args.steps, args.warmup, args.cap_gib = "fp32", 2, 1, 0.0
        args.longest = [n for n in args.longest if n <= 1024] or [256, 512, 1024]
        # plain trl 1.15 computes the loss with a Triton kernel (its fused LM head), which needs a GPU
        args.configs = [name for name in args.configs if CONFIGS[name]["backend"] == "unsloth"]
    if not args.model:
        parser.error("--model is required (or --smoke)")
    if args.worker:
        kind, _, name = args.worker.partition(":")
        with tempfile.TemporaryDirectory() as run_dir:
            result = (longest_sequence(args.model, args.cap_gib, args.longest, args.precision, not args.smoke, name,
                                       Path(args.out))
                      if kind == "longest" else
                      worker(name, args.model, args.steps, args.warmup, args.precision, args.cap_gib, not args.smoke,
                             run_dir, args.profile))
        Path(args.out).write_text(json.dumps(result))
        return
    results = []
    jobs = ([f"config:{name}" for _ in range(args.repeat) for name in args.configs]
            + ([f"longest:{mode}" for mode in args.longest_modes] if args.longest else []))
    for job in jobs:
        started = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--worker", job, "--model", args.model, "--out", out.name,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
                       "--cap-gib", str(args.cap_gib), "--longest", *map(str, args.longest),
                       *(["--profile", args.profile] if args.profile else []), *(["--smoke"] if args.smoke else [])]
            environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                           **(CONFIGS[job.partition(":")[2]].get("environment", {}) if job.startswith("config:")
                              else {})}
            try:
                proc = subprocess.run(command, env=environment, capture_output=True, text=True,
                                      timeout=args.job_timeout)
                failed = proc.returncode and {"job": job, "error": proc.stderr[-3000:]}
            except subprocess.TimeoutExpired:
                failed = {"job": job, "error": f"stopped after {args.job_timeout:.0f} s (--job-timeout)"}
            partial = Path(out.name).read_text()
            result = json.loads(partial) if partial else failed
            if failed and partial:
                result["cut_short"] = failed["error"][-500:]
        result["process_s"] = round(time.perf_counter() - started, 1)
        results.append(result)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"{job}: {result['process_s']:.0f} s{' (failed)' if 'error' in result else ''}", flush=True)
    print("\n" + table(results))
    if args.repeat > 1:
        print("\n" + medians_table(results))


if __name__ == "__main__":
    main()
