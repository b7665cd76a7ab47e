#!/usr/bin/env bash
# On a CUDA machine without the Hub, in one go: the GPU tests (`pytest -m gpu`: 4-bit load, fp16, the 15 GiB cap,
# the fast default trained step for step against the recipe), then the speed table (bench/speed.py: tutorial, fast
# default, packed 8k, plain transformers + peft + bitsandbytes, longest row under the cap), on the random-init 8B
# shape saved pre-quantized in 4-bit in $1 (built there first if missing: python -m helpers.local_models DIR
# --shape llama-8b --prequantized).
# Everything lands in $OUT (default outputs/gpu-speed): pytest_gpu.txt, gpu_equality.json, speed.txt, speed.json.
# About 3 minutes of tests and 6 of benchmark on an H200, time-boxed (GPU_TESTS_S=210, SPEED_S=370) so that a slow part still
# leaves the other's results (speed.json is rewritten after every configuration).
# Usage: OUT=/some/dir bash bench/gpu_speed.sh /dev/shm/llama8b
set -uo pipefail
MODEL=${1:?usage: bash bench/gpu_speed.sh MODEL_DIR}
OUT=${OUT:-outputs/gpu-speed}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
"$PY" -m helpers.local_models "$MODEL" --shape llama-8b --prequantized
KIT_GPU_MODEL="$MODEL" KIT_GPU_REPORT="$OUT/gpu_equality.json" timeout "${GPU_TESTS_S:-210}" \
  "$PY" -m pytest -m gpu -v -s -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | grep -v "it/s"
timeout "${SPEED_S:-370}" "$PY" bench/speed.py --model "$MODEL" --out "$OUT/speed.json" --steps 5 --warmup 2 \
  2>&1 | tee "$OUT/speed.txt"
