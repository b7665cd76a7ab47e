#!/usr/bin/env bash
# One GPU against two, on a machine with two CUDA GPUs: the same run (the 8B-shaped stand-in pre-quantized in 4-bit,
# the colab_t4 recipe, fp16, the bundled sample data, 20 steps) on one process, then through `accelerate launch` on
# two with the same global batch (accumulation halved), then the training notebook with num_processes=2 through
# papermill. Prints steady tokens/s, s/step, the scaling, peak memory per GPU and the largest per-step loss difference.
# Usage: bash bench/gpu_two_gpus.sh [model_dir] [phases]   (build the model first: python3 bench/standin.py
#        DIR). phases: any of "one two report" (default all; "one" runs on the first
#        visible GPU, so it can run beside other work on another GPU).
set -euo pipefail
MODEL=${1:-outputs/_models/llama8b-bnb-4bit}
PHASES=${2:-one two report}
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
RUN="--profile colab_t4 -p model_name $MODEL -p precision fp16 -p dataset helpers/data/sample_dpo.jsonl
     -p max_steps 20 -p save_steps 100 -p eval_fraction 0 -p overwrite true"
if [[ $PHASES == *one* ]]; then
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python3 -m helpers.train $RUN -p run_dir outputs/gpu-1gpu
fi
if [[ $PHASES == *two* ]]; then
  # shellcheck disable=SC2086
  python3 -m accelerate.commands.launch --num_processes 2 -m helpers.train $RUN -p run_dir outputs/gpu-2gpu
  # shellcheck disable=SC2086
  python3 -m helpers.pipeline $RUN --notebooks 01_train_lora -p num_processes 2 -p run_dir outputs/gpu-2gpu-notebook \
    || echo "the notebook on 2 GPUs failed: see outputs/gpu-2gpu-notebook/01_train_lora.ipynb"
fi
[[ $PHASES == *report* ]] || exit 0
python3 - <<'PY'
import csv, json
def run(name):
    record = json.load(open(f"outputs/{name}/run.json"))
    losses = [float(r["loss"]) for r in csv.DictReader(open(f"outputs/{name}/train_log.csv"))]
    return record, losses
(one, l1), (two, l2) = run("gpu-1gpu"), run("gpu-2gpu")
m1, m2 = one["metrics"], two["metrics"]
print("| | 1 GPU | 2 GPUs |\n|---|---|---|")
print(f"| trained tokens/s after 2 warm-up steps | {m1['steady_tokens_per_s']:,.0f} | {m2['steady_tokens_per_s']:,.0f} |")
print(f"| s/step | {m1['steady_s_per_step']:.2f} | {m2['steady_s_per_step']:.2f} |")
print(f"| scaling | 1.00 | {m2['steady_tokens_per_s'] / m1['steady_tokens_per_s']:.2f} |")
for label, record in (("1 GPU", one), ("2 GPUs", two)):
    peaks = [p.get("peak_gpu_reserved_gib") for p in record["distributed"]["peak_memory_per_process"]]
    print(f"peak reserved GiB per GPU, {label}: {peaks}; distributed: "
          f"{ {k: v for k, v in record['distributed'].items() if k != 'peak_memory_per_process'} }")
diffs = [abs(a - b) for a, b in zip(l1, l2)]
worst = max(range(len(diffs)), key=diffs.__getitem__)
print(f"per-step losses: {len(l1)} vs {len(l2)} steps; largest difference {diffs[worst]:.4f} at step {worst + 1} "
      f"({l1[worst]:.4f} vs {l2[worst]:.4f}); mean {sum(diffs) / len(diffs):.4f}")
print("1 GPU :", [round(x, 4) for x in l1]); print("2 GPUs:", [round(x, 4) for x in l2])
try:
    nb = json.load(open("outputs/gpu-2gpu-notebook/run.json"))
    print("notebook, num_processes=2:", nb["status"], nb["distributed"]["num_processes"], "processes,",
          nb["metrics"].get("steady_tokens_per_s"), "tokens/s")
except (OSError, KeyError) as error:
    print("notebook, num_processes=2: no finished run.json:", error)
PY
