#!/usr/bin/env bash
# The user's run at the real data's scale on the CPU: SmolLM2-135M-Instruct (profile cpu_smollm2, its settings as
# they are) on 10,884 rows shaped like HumanLLMs/Human-Like-DPO-Dataset (bench/real_shaped_data.py), every stage timed
# in run.json. Two runs under the same conditions:
#   before: the trainer scores every held-out row (1,088) every eval_steps, as the kit did until 2026-12-06;
#   after:  the default, a fixed seeded subset of them (helpers.data.training_eval_count).
# "after" runs the whole pipeline (setup -> train -> inference -> evaluate); "before" the training notebook alone.
# Then the answers of 02_inference generated one prompt at a time, against the batch the notebook generated.
# Prints each run's stages (seconds and share) and writes bench/results-cpu-real-scale-<date>.json.
# Usage: bash bench/cpu_real_scale.sh            (about an hour on 2 cores)
#        ROWS=400 STEPS=4 bash bench/cpu_real_scale.sh   (a smoke run of the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROWS=${ROWS:-10884}
STEPS=${STEPS:-30}
DATA=outputs/_data/human_like_dpo_shaped-$ROWS.jsonl
OUT=${OUT:-bench/results-cpu-real-scale-$(date +%F).json}
$PY bench/real_shaped_data.py --rows "$ROWS" --out "$DATA"
COMMON=(--profile cpu_smollm2 -p dataset "$DATA" -p max_steps "$STEPS" -p overwrite true)
HELD=$($PY -c "print(round($ROWS * 0.1))")  # cpu_smollm2's eval_fraction
$PY -m helpers.pipeline "${COMMON[@]}" --notebooks 00_setup 01_train_lora -p run_dir outputs/real-scale-before \
  -p training_eval_rows "$HELD"
$PY -m helpers.pipeline "${COMMON[@]}" -p run_dir outputs/real-scale-after
$PY bench/generation_cost.py outputs/real-scale-after
$PY - "$OUT" <<'PY'
import json, platform, subprocess, sys
from datetime import date
from helpers.timing import shares
runs = {name: json.load(open(f"outputs/real-scale-{name}/run.json")) for name in ("before", "after")}
result = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
          f"{subprocess.run(['nproc', '--all'], capture_output=True, text=True).stdout.strip()} cores",
          "load_average_at_end": open("/proc/loadavg").read().split()[:3]}
for name, record in runs.items():
    stages = record["stages"]
    evaluation, steps = stages["in-training evaluation"], stages["training steps"]
    split = json.load(open(f"outputs/real-scale-{name}/split.json"))
    result[name] = {"stages_s": stages, "in_training_eval_rows": record["metrics"]["training_eval_rows"],
                    "held_out_rows": len(split["eval_indices"]), "train_rows": record["metrics"]["train_rows"],
                    "evaluation_over_training_steps": round(evaluation / steps, 3),
                    "metrics": record["metrics"]}
    print(f"\n{name}: {result[name]['in_training_eval_rows']} of {result[name]['held_out_rows']} held-out rows "
          f"scored every eval_steps; in-training evaluation = {evaluation / steps:.1%} of the training steps")
    for stage, seconds, share in shares(stages):
        print(f"  {stage:28} {seconds:8.1f} s {share:6.1%}")
result["generation"] = json.load(open("outputs/real-scale-after/generation_cost.json"))
print("\ngeneration:", result["generation"])
json.dump(result, open(sys.argv[1], "w"), indent=2)
print("written", sys.argv[1])
PY
