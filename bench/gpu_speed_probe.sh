#!/usr/bin/env bash
# What makes the fast step faster, on one CUDA GPU alone, in one go (the third probe of 2026-11-30): the fast default
# as committed, padded instead of padding-free (unsloth compiles each decoder layer only for padded batches), padded
# without that compile, padding-free with one SDPA call a layer, and the fast default again (the spread between two
# processes of the same code). Per-step times in steps.json.
# Usage: OUT=/some/dir bash bench/gpu_speed_probe.sh MODEL_DIR
set -uo pipefail
MODEL=${1:?usage: bash bench/gpu_speed_probe.sh MODEL_DIR}
OUT=${OUT:-outputs/gpu-probe}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
python3 bench/standin.py "$MODEL" > "$OUT/build.txt" 2>&1
timeout "${PROBE_S:-480}" python3 bench/speed.py --model "$MODEL" --out "$OUT/steps.json" \
  --configs ${CONFIGS:-fast fast-padded fast-one-sdpa fast-padded-eager fast} --steps 8 --warmup 3 --longest \
  --job-timeout 110 > "$OUT/steps.txt" 2>&1
tail -n 12 "$OUT"/*.txt
