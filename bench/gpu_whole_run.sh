#!/usr/bin/env bash
# The user's whole run at real scale on a CUDA machine standing in for a T4 (fp16, 15 GiB cap): the 8B stand-in
# (bench/standin.py: random weights, Llama 3's tokenizer) saved pre-quantized into the Hugging Face cache under the
# checkpoint of record's id, its 16-bit weights under the id unsloth merges merged_16bit from, as a download leaves
# them (the run uses the real model_name, offline); then colab_end_to_end on 10,884
# real-shaped rows, 120 steps, with micro_batching auto and recipe (bench/whole_run.py). MODES picks them (default
# both); results in $OUT/whole_run.json and whole_run.txt.
# Usage: OUT=/some/dir MODES="auto" bash bench/gpu_whole_run.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu-whole-run}
PY=${PYTHON:-python3}
MODEL=unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
"$PY" bench/standin.py --hub-cache "$MODEL" --sixteen-bit unsloth/DeepSeek-R1-Distill-Llama-8B > "$OUT/build.txt" 2>&1 \
  || { tail -20 "$OUT/build.txt"; exit 1; }
# shellcheck disable=SC2086
"$PY" bench/whole_run.py --model "$MODEL" --modes ${MODES:-auto recipe} --out "$OUT/whole_run.json" 2>&1 \
  | grep -v -E "it/s\]|s/it\]|Executing" > "$OUT/whole_run.txt"
tail -n 60 "$OUT/whole_run.txt"
