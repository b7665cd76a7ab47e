#!/usr/bin/env bash
# The Colab path on a CUDA machine standing in for a T4 (fp16 forced, GPU memory capped at 15 GiB): the 8B-shaped
# random-init model saved pre-quantized in 4-bit like the checkpoint of record, then colab_end_to_end in one kernel
# (train 10 steps on the bundled sample data -> answer -> evaluate -> export the default formats), then the opt-in
# merged_16bit export in a kernel of its own (free-disk check, 4-bit reload check under the cap). Prints the peaks
# run.json recorded and the export manifest.
# The stand-in sits in local folders named like the Hub repositories (the checkpoint of record and the 16-bit
# original unsloth merges merged_16bit from), so the run uses the real model_name and unsloth's own name mapping.
# Usage: bash bench/gpu_colab_t4.sh [run_dir]
set -euo pipefail
RUN=${1:-outputs/gpu-colab-t4}
MODEL=unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
T4="-p precision fp16 -p max_gpu_memory_gib 15"
python3 bench/standin.py "$MODEL" --sixteen-bit unsloth/DeepSeek-R1-Distill-Llama-8B
# shellcheck disable=SC2086
python3 -m helpers.pipeline --profile colab_t4 --notebooks colab_end_to_end -p model_name "$MODEL" $T4 \
  -p dataset helpers/data/sample_dpo.jsonl -p max_steps 10 -p eval_steps 5 -p max_new_tokens 48 -p run_dir "$RUN" \
  -p overwrite true
# shellcheck disable=SC2086
python3 -m helpers.pipeline --profile colab_t4 --notebooks 04_export -p run_dir "$RUN" $T4 -p formats '[merged_16bit]' \
  -p max_new_tokens 48 || echo "merged_16bit export failed (see $RUN/04_export.ipynb)"
python3 - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
record = json.load(open(f"{run}/run.json"))
print("training:", {k: v for k, v in record["metrics"].items() if k.startswith(("peak", "tokens_per", "steps"))})
print("whole runtime (train -> export):", record.get("runtime_peak_memory"))
print("evaluation:", json.load(open(f"{run}/eval.json")).get("memory"))
manifest = json.load(open(f"{run}/export/manifest.json"))
for name, e in manifest["formats"].items():
    r = e.get("reload", {})
    print(f"{name:13} {e['status']:8} {e.get('total_bytes', 0) / 2**30:7.2f} GiB {e.get('seconds', '')!s:>7} s "
          f"loaded={r.get('loaded')} in={r.get('loaded_in')} same_answer={r.get('same_answer')} "
          f"agreement={r.get('token_agreement')} {e.get('reason') or r.get('error') or ''}")
PY
