#!/usr/bin/env bash
# On a CUDA machine without the Hub: build a random-init model of the real 8B architecture (Llama-3.1-8B shape, saved
# pre-quantized in 4-bit like the checkpoint of record,
# as DeepSeek-R1-Distill-Llama-8B) and run setup -> train -> inference through papermill with the colab_t4
# profile, as a T4 user would: 4-bit, fp16, GPU memory capped at 15 GiB, the bundled sample data, 10 steps.
# Usage: bash bench/gpu_pipeline.sh [model_dir] [run_dir]
set -euo pipefail
MODEL=${1:-outputs/_models/llama8b-bnb-4bit}
RUN=${2:-outputs/gpu-t4-standin}
python3 bench/standin.py "$MODEL"
python3 -m helpers.pipeline --profile colab_t4 -p model_name "$MODEL" -p dataset helpers/data/sample_dpo.jsonl \
  -p max_steps 10 -p precision fp16 -p max_gpu_memory_gib 15 -p run_dir "$RUN" -p max_new_tokens 32
