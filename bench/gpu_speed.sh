#!/usr/bin/env bash
# On a CUDA machine without the Hub, in one go on one GPU, nothing else running on it: the speed table
# (bench/speed.py: tutorial, fast default, packed 8k, plain transformers + peft + bitsandbytes, each in its own
# process; CONFIGS names others), then the GPU tests (`pytest -m gpu`: 4-bit load, fp16, the 15 GiB cap, the fast
# default trained step for step against the recipe; GPU_TESTS_S=0 leaves them out), then, where LONGEST_S is set,
# the longest row under the cap (unsloth's tiled MLP, as shipped and with its backward patched: bench/speed.py
# LONGEST_MODES). The model: the random-init 8B shape saved
# pre-quantized in 4-bit in $1 (built there first if missing: python bench/standin.py DIR).
# Everything lands in $OUT (default outputs/gpu-speed): speed.txt, speed.json, pytest_gpu.txt, gpu_equality.json,
# longest.txt, longest.json. About 7 minutes on an H200 without the longest row; each part time-boxed so that a slow
# one leaves the others' results (the JSON files are rewritten as they go).
# Usage: OUT=/some/dir bash bench/gpu_speed.sh /dev/shm/llama8b
set -uo pipefail
MODEL=${1:?usage: bash bench/gpu_speed.sh MODEL_DIR}
OUT=${OUT:-outputs/gpu-speed}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
"$PY" bench/standin.py "$MODEL" > "$OUT/build.txt" 2>&1
timeout "${SPEED_S:-420}" "$PY" bench/speed.py --model "$MODEL" --out "$OUT/speed.json" --steps 8 --warmup 3 \
  ${CONFIGS:+--configs $CONFIGS} --longest --job-timeout 200 > "$OUT/speed.txt" 2>&1
if [ "${GPU_TESTS_S:-200}" -gt 0 ]; then
  KIT_GPU_MODEL="$MODEL" KIT_GPU_REPORT="$OUT/gpu_equality.json" timeout "${GPU_TESTS_S:-200}" \
    "$PY" -m pytest -m gpu -v -s -p no:cacheprovider 2>&1 | grep -v "it/s" > "$OUT/pytest_gpu.txt"
fi
if [ "${LONGEST_S:-0}" -gt 0 ]; then
  timeout "$LONGEST_S" "$PY" bench/speed.py --model "$MODEL" --out "$OUT/longest.json" --configs \
    --longest ${LONGEST:-40960 49152 57344 65536} --longest-modes tiled tiled-patched --job-timeout 200 \
    > "$OUT/longest.txt" 2>&1
fi
tail -n 12 "$OUT"/*.txt
