"""The user's whole run at the real data's scale: colab_end_to_end through papermill (train 120 steps -> answer ->
evaluate -> export the LoRA adapter) on 10,884 rows shaped like HumanLLMs/Human-Like-DPO-Dataset
(bench/real_shaped_data.py), the colab_t4 recipe in fp16 under a 15 GiB cap, once with micro_batching="auto" (the
default) and once with "recipe". Prints each stage's seconds and share (run.json's `stages`), the peak GPU memory
and RSS, and what each stage would take on a T4, scaled from what bounds it:
- FLOPs: training steps, in-training evaluation and held-out scoring. Tokens (counted with the run's tokenizer) x
  FLOPs a token (8.03e9 parameters; 2 forward, 2 backward, 2 more per layer recomputed under gradient
  checkpointing, none for a layer kept) over 25-35% (the recipe's 2-row micro-batches) or 35-45% (larger ones) of
  the T4's 65 TFLOP/s fp16 peak;
- memory bandwidth: generation, one step per new token of a batch, each reading the 5.7 GB of weights (4-bit layers,
  16-bit embeddings and output layer) at 40-60% of the T4's 320 GB/s, but never less than measured here (up to
  twice that): steps slower than the GPU's bandwidth allows waited on kernel launches, no faster on a Colab VM;
- latency and I/O: the rest (loading, LoRA, building the trainer, saving), as measured here to twice that (a Colab
  VM's 2 vCPUs and disk are slower than a GPU host's; downloading the 5.7 GB checkpoint from the Hub comes on top).
Writes the results as JSON. --smoke runs the same on the CPU with the tiny model and a few hundred rows (the T4
column then means nothing), to check the script.

    python bench/whole_run.py --model unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit --out whole.json
    python bench/whole_run.py --smoke --out /tmp/whole-smoke.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_shaped_data import REAL_ROWS, write_rows  # noqa: E402

PARAMETERS = 8.03e9
T4_FLOPS = 65e12
T4_BANDWIDTH = 320e9
WEIGHT_BYTES = 5.7e9
FLOP_BOUND = ("training steps", "in-training evaluation", "held-out rows scored")
BANDWIDTH_BOUND = ("answers generated", "side-by-side answers")


def run(mode: str, args) -> Path:
    """colab_end_to_end with micro_batching=mode; returns its run_dir."""
    from helpers.pipeline import run_pipeline

    overrides = {"dataset": str(args.data), "micro_batching": mode, "run_dir": f"outputs/whole-run-{mode}",
                 "overwrite": True, "max_steps": args.steps}
    if args.smoke:
        overrides.update(eval_steps=max(1, args.steps // 2), save_steps=args.steps, max_new_tokens=16)
        return run_pipeline("cpu_tiny", overrides, ("colab_end_to_end",))
    overrides.update(model_name=args.model, precision="fp16", max_gpu_memory_gib=15.0)
    return run_pipeline("colab_t4", overrides, ("colab_end_to_end",))


def token_counts(run_dir: Path) -> dict[str, int]:
    """Tokens each FLOP-bound stage computed, and the generation steps, counted from the run's own records."""
    from transformers import AutoTokenizer

    from helpers.config import RunConfig
    from helpers.data import load_rows
    from helpers.prompts import format_training_text
    from helpers.records import read_json, read_train_log

    record = read_json(run_dir / "run.json")
    config = RunConfig.from_dict(record["parameters"])
    tokenizer = AutoTokenizer.from_pretrained(config.model_name)
    tokenizer.model_max_length = 10**9  # counting whole rows, cut at max_seq_length below: no warning
    rows, split = load_rows(config.dataset), read_json(run_dir / "split.json")

    def tokens(indices: list[int], field: str) -> int:
        texts = [format_training_text(config.prompt_template, rows[i][config.prompt_field], rows[i][field],
                                      tokenizer.eos_token, tokenizer, config.system_prompt) for i in indices]
        return sum(min(len(ids), config.max_seq_length) for ids in tokenizer(texts)["input_ids"])

    evaluations = sum(r["eval_loss"] is not None for r in read_train_log(run_dir / "train_log.csv"))
    evaluation = read_json(run_dir / "eval.json")
    scored, models = evaluation["rows"], 2 + len(evaluation["compared"])  # models: base, compared runs, tuned
    generated = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    longest = max(len(tokenizer(g["response"], add_special_tokens=False)["input_ids"]) for g in generated)
    return {"training steps": record["metrics"]["trained_tokens"],
            "in-training evaluation": evaluations * tokens(split["training_eval_indices"], config.response_field),
            "held-out rows scored": models * sum(tokens(split["eval_indices"][:scored], field)
                                                 for field in (config.response_field, config.rejected_field)),
            # one step per new token of each batch: the answers of 02 (one batch), base and tuned side by side (two)
            "answers generated": min(longest + 1, config.max_new_tokens),
            "side-by-side answers": 2 * config.max_new_tokens}


def t4_seconds(stage: str, measured: float, counts: dict[str, int], record: dict) -> tuple[float, float, str]:
    """(low, high) seconds the stage would take on a T4, and what bounds it."""
    if stage in FLOP_BOUND:
        if stage == "training steps":
            kept = record.get("distributed", {}).get("layers_kept_per_micro_batch", {})
            recomputed = 1 - kept.get("mean", 0) / kept["layers"] if kept else 1.0
            flops = counts[stage] * PARAMETERS * (4 + 2 * recomputed)
            small = record["distributed"]["per_device_train_batch_size"] <= 2
            share = (0.25, 0.35) if small else (0.35, 0.45)
        else:
            flops, share = counts[stage] * PARAMETERS * 2, (0.35, 0.45)
        return flops / (T4_FLOPS * share[1]), flops / (T4_FLOPS * share[0]), "FLOPs"
    if stage in BANDWIDTH_BOUND:  # never below what was measured: where that is slower than the GPU's bandwidth
        # allows, its steps waited on kernel launches (the CPU), which a Colab VM's 2 vCPUs do no faster
        steps = counts[stage] * WEIGHT_BYTES
        return (max(steps / (T4_BANDWIDTH * 0.6), measured), max(steps / (T4_BANDWIDTH * 0.4), 2 * measured),
                "memory bandwidth")
    return measured, 2 * measured, "latency and I/O"


def summarize(run_dir: Path) -> dict:
    """The run's stages with shares and T4 estimates, its peaks and metrics."""
    from helpers.records import read_json
    from helpers.timing import shares

    record = read_json(run_dir / "run.json")
    counts = token_counts(run_dir)
    stages = []
    for stage, seconds, share in shares(record["stages"]):
        low, high, basis = t4_seconds(stage, seconds, counts, record)
        stages.append({"stage": stage, "seconds": seconds, "share": round(share, 4), "t4_low_s": round(low, 1),
                       "t4_high_s": round(high, 1), "t4_basis": basis, "tokens": counts.get(stage)})
    training = record["stages"]["training steps"]
    return {"stages": stages, "total_s": round(sum(record["stages"].values()), 1),
            "t4_total_s": [round(sum(s["t4_low_s"] for s in stages)), round(sum(s["t4_high_s"] for s in stages))],
            "in_training_evaluation_over_training_steps": round(record["stages"]["in-training evaluation"] / training, 3),
            "training_metrics": record["metrics"], "runtime_peak_memory": record.get("runtime_peak_memory"),
            "distributed": record.get("distributed"), "accelerator": record.get("accelerator")}


def print_summary(mode: str, summary: dict) -> None:
    print(f"\nmicro_batching={mode}: {summary['total_s']:.0f} s recorded; in-training evaluation "
          f"{summary['in_training_evaluation_over_training_steps']:.1%} of the training steps; peaks "
          f"{summary['runtime_peak_memory']}")
    print(f"{'stage':26} {'seconds':>8} {'share':>6}   {'on a T4 (s)':>14}  bound by")
    for s in summary["stages"]:
        print(f"{s['stage']:26} {s['seconds']:8.1f} {s['share']:6.1%}   {s['t4_low_s']:6.0f}-{s['t4_high_s']:<7.0f}"
              f"  {s['t4_basis']}")
    low, high = summary["t4_total_s"]
    print(f"{'total':26} {summary['total_s']:8.1f}          {low:6.0f}-{high:<7.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/whole_run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit",
                        help="the base model (the 8B stand-in, bench/standin.py, in a folder named like it)")
    parser.add_argument("--modes", nargs="+", default=["auto", "recipe"], choices=["auto", "recipe"])
    parser.add_argument("--rows", type=int, default=REAL_ROWS)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="bench/whole_run.json")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 300 rows, 6 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.steps = min(args.rows, 300), min(args.steps, 6)
    args.data = write_rows(ROOT / "outputs" / "_data" / f"human_like_dpo_shaped-{args.rows}.jsonl", args.rows)
    results = {"date": time.strftime("%Y-%m-%d"), "rows": args.rows, "steps": args.steps, "smoke": args.smoke,
               "modes": {}}
    for mode in args.modes:
        started = time.perf_counter()
        run_dir = run(mode, args)
        summary = {"wall_s": round(time.perf_counter() - started, 1), **summarize(run_dir)}
        results["modes"][mode] = summary
        print_summary(mode, summary)
        Path(args.out).write_text(json.dumps(results, indent=2))  # rewritten after each mode: a cut run keeps its part
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
