#!/usr/bin/env bash
# On a CUDA machine, after bench/gpu_pipeline.sh: DPO (06) for a few steps continuing that 4-bit 8B-architecture
# run, as a T4 user would (fp16, GPU memory capped at 15 GiB), then base / SFT / DPO compared (03). Peak GPU
# memory lands in the DPO run's run.json (metrics.peak_gpu_reserved_gib).
# Usage: bash bench/gpu_dpo.sh [sft_run_dir] [run_dir]
set -euo pipefail
SFT=${1:-outputs/gpu-t4-standin}
RUN=${2:-outputs/gpu-t4-standin-dpo}
python3 -m helpers.pipeline --profile colab_t4_dpo --notebooks 06_preference_dpo 03_evaluate -p sft_run_dir "$SFT" \
  -p run_dir "$RUN" -p max_steps 5 -p precision fp16 -p max_gpu_memory_gib 15 -p max_new_tokens 32 -p max_eval_rows 20
python3 -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print({k: m.get(k) for k in \
  ('steps', 'final_loss', 'final_rewards_accuracies', 'peak_gpu_allocated_gib', 'peak_gpu_reserved_gib')})" "$RUN/run.json"
