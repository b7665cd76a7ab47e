"""What batching the answers saves: a finished run's prompts answered greedily one at a time (as the notebooks did
until 2026-12-06, and still do while streaming to a watcher) and all at once (helpers.inference.generate_batch), on
the tuned model; the wall time of each, the answers compared. Writes run_dir/generation_cost.json.

    python bench/generation_cost.py outputs/real-scale-after
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers.stack  # noqa: E402,F401  (unsloth first)
from helpers.config import RunConfig  # noqa: E402
from helpers.environment import resolve_precision  # noqa: E402
from helpers.inference import generate, generate_batch  # noqa: E402
from helpers.modeling import load_trained_model  # noqa: E402
from helpers.records import read_json, write_json  # noqa: E402


def main(run_dir: str) -> dict:
    config = RunConfig.from_dict(read_json(Path(run_dir) / "run.json")["parameters"])
    precision = resolve_precision(config.precision)
    model, tokenizer = load_trained_model(config, precision, Path(run_dir) / "adapter")
    args = (config.prompt_template, config.max_new_tokens, 0.0)
    started = time.perf_counter()
    one_by_one = [generate(model, tokenizer, prompt, *args, system_prompt=config.system_prompt)
                  for prompt in config.prompts]
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    batched = generate_batch(model, tokenizer, config.prompts, *args, config.system_prompt)
    batch = time.perf_counter() - started
    result = {"prompts": len(config.prompts), "max_new_tokens": config.max_new_tokens,
              "one_at_a_time_s": round(sequential, 1), "batched_s": round(batch, 1),
              "saving": round(1 - batch / sequential, 3),
              "same_answers": sum(a == b for a, b in zip(one_by_one, batched)),
              "answer_tokens": [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in one_by_one]}
    write_json(Path(run_dir) / "generation_cost.json", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1])
