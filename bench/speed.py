"""Training speed and memory of the recipe on a CUDA machine: the tutorial's settings, the kit's fast settings, and
plain transformers + peft + bitsandbytes, each configuration in its own process; then the longest sequence that
trains under a memory cap standing in for a T4. Prints a table and writes JSON.

Rows are synthetic token ids whose lengths follow the Human-Like-DPO data as our Alpaca template renders it: about
60 tokens of template and prompt plus a `chosen` answer of roughly 100-300 words (1.3 tokens a word), i.e. a
log-normal length with median 240 tokens, clipped to 90-700 (see ROW_LENGTHS). Random weights: the loss only has
to stay finite.

    python bench/speed.py --model /dev/shm/llama8b --out bench.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROW_LENGTHS = dict(median=240, sigma=0.45, low=90, high=700)
PARAMS_8B = 8.03e9
PEAK_FLOPS = 790e12  # H200 dense bf16/fp16 tensor throughput reachable in practice
CONFIGS = {
    # name: (backend, micro-batch rows, accumulation, packing, max_length)
    "tutorial": ("unsloth", 2, 4, False, 2048),  # the tutorial's settings
    "packed-4k": ("unsloth", 2, 4, True, 4096),  # fast candidates: rows packed into long sequences
    "packed-8k": ("unsloth", 1, 8, True, 8192),
    "hf-tutorial": ("hf", 2, 4, False, 2048),  # plain transformers + peft + bitsandbytes, tutorial's settings
}


def row_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths of n training rows (see ROW_LENGTHS)."""
    import random

    rng = random.Random(seed)
    mu = math.log(ROW_LENGTHS["median"])
    return [min(ROW_LENGTHS["high"], max(ROW_LENGTHS["low"], round(rng.lognormvariate(mu, ROW_LENGTHS["sigma"]))))
            for _ in range(n)]


def synthetic_dataset(n: int, vocab: int, eos: int):
    """Pre-tokenized rows (trl skips tokenization when input_ids are given)."""
    import random

    from datasets import Dataset

    rng = random.Random(1)
    return Dataset.from_dict({"input_ids": [[rng.randrange(10, vocab) for _ in range(k - 1)] + [eos]
                                            for k in row_lengths(n)]})


def load(backend: str, model_path: str, max_length: int, precision: str):
    """Model with LoRA r=64 on the seven projections, 4-bit base, and its tokenizer."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if backend == "unsloth":
        from helpers.stack import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_path, max_seq_length=max_length, dtype=dtype,
                                                             load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=64, lora_alpha=16, lora_dropout=0.0, target_modules=modules,
                                                 use_gradient_checkpointing="unsloth", random_state=3927)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=modules,
                                             task_type="CAUSAL_LM"))
    for param in model.parameters():
        if param.requires_grad:  # the QLoRA recipe: trainable weights in fp32, so the fp16 grad scaler can unscale
            param.data = param.data.float()
    return model, AutoTokenizer.from_pretrained(model_path)


def worker(name: str, model_path: str, steps: int, warmup: int, precision: str) -> dict:
    """Train one configuration for warmup + steps optimizer steps; measure after the warm-up."""
    backend, batch, accumulation, packing, max_length = CONFIGS[name]
    if backend == "unsloth":
        import helpers.stack  # noqa: F401  (before trl)
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load(backend, model_path, max_length, precision)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    rows = batch * accumulation * (steps + warmup)
    if packing:  # enough rows to fill every packed sequence, with room to spare
        rows = math.ceil(rows * max_length / ROW_LENGTHS["median"] * 1.3)
    args = SFTConfig(output_dir="/tmp/bench-out", per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation, max_steps=steps + warmup, learning_rate=2e-4,
                     lr_scheduler_type="linear", warmup_steps=2, optim="adamw_8bit", logging_steps=1,
                     fp16=precision == "fp16", bf16=precision == "bf16", packing=packing, max_length=max_length,
                     save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding", seed=3407,
                     dataset_num_proc=1)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args, callbacks=[Clock()],
                         train_dataset=synthetic_dataset(rows, min(tokenizer.vocab_size, 1000), tokenizer.eos_token_id))
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup - 1], marks[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"config": name, "backend": backend, "micro_batch_rows": batch, "accumulation": accumulation,
            "packing": packing, "max_length": max_length, "precision": precision,
            "tokens_per_s": round(tokens_per_s, 1), "s_per_step": round((t1 - t0) / (len(marks) - warmup), 3),
            "tokens_per_step": round((n1 - n0) / (len(marks) - warmup)),
            "mfu": round(tokens_per_s * 6 * PARAMS_8B / PEAK_FLOPS, 4),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "final_loss": losses[-1], "loss_finite": all(math.isfinite(x) for x in losses)}


def longest_sequence(model_path: str, cap_gib: float, lengths: list[int], precision: str) -> dict:
    """The longest single row that trains (forward + backward) with GPU memory capped at cap_gib."""
    import helpers.stack  # noqa: F401
    import torch

    torch.cuda.set_per_process_memory_fraction(cap_gib / (torch.cuda.get_device_properties(0).total_memory / 2**30))
    model, _ = load("unsloth", model_path, max(lengths), precision)
    model.train()
    fits = {}
    for length in lengths:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(10, 1000, (1, length), device="cuda")
        try:
            with torch.autocast("cuda", dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            fits[length] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        except torch.OutOfMemoryError:
            fits[length] = None
            break
        finally:
            loss = None
    ok = [n for n, gib in fits.items() if gib is not None]
    return {"cap_gib": cap_gib, "precision": precision, "tried": fits, "longest_tokens": max(ok) if ok else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--longest", nargs="*", type=int, default=[8192, 16384, 24576, 32768, 40960, 49152, 65536])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, _, name = args.worker.partition(":")
        result = (longest_sequence(args.model, 15.0, args.longest, args.precision) if kind == "longest"
                  else worker(name, args.model, args.steps, args.warmup, args.precision))
        Path(args.out).write_text(json.dumps(result))
        return
    results = []
    jobs = [f"config:{name}" for name in args.configs] + (["longest:"] if args.longest else [])
    for job in jobs:
        out = Path(f"/tmp/bench-{len(results)}.json")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", job, "--model", args.model, "--out", str(out),
                               "--steps", str(args.steps), "--warmup", str(args.warmup),
                               "--precision", args.precision, "--longest", *map(str, args.longest)],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                                os.environ.get("PYTHONPATH", "")])},
                              capture_output=True, text=True)
        if proc.returncode:
            results.append({"job": job, "error": proc.stderr[-1500:]})
        else:
            results.append(json.loads(out.read_text()))
        print(f"{job}: {time.perf_counter() - started:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n| configuration | tokens/s | s/step | tokens/step | MFU | peak alloc GiB | peak reserved GiB | loss finite |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "tokens_per_s" in r:
            print(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['s_per_step']} | {r['tokens_per_step']:,} | "
                  f"{r['mfu']:.1%} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} | {r['loss_finite']} |")
        elif "longest_tokens" in r:
            print(f"\nlongest row under {r['cap_gib']} GiB ({r['precision']}): {r['longest_tokens']:,} tokens; {r['tried']}")
        else:
            print(f"\n{r['job']} failed:\n{r['error']}")


if __name__ == "__main__":
    main()
