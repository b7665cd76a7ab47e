#!/usr/bin/env bash
# What the fast step spends and how long a row can be, on a two-GPU CUDA machine, in one go (the probes of 2026-11-30
# before settling the fast default). GPU 0 times and profiles the fast step with SDPA kept off cuDNN attention,
# padding-free and padded; GPU 1 times it with gradient checkpointing kept on the GPU, then searches the longest row
# under the 15 GiB cap with unsloth's tiled MLP, its backward replaced (bench/speed.py, mode tiled-patched).
# Everything lands in $OUT (the profiler tables packed in profile.tar.gz).
# Usage: OUT=/some/dir bash bench/gpu_speed_probe.sh MODEL_DIR
set -uo pipefail
MODEL=${1:?usage: bash bench/gpu_speed_probe.sh MODEL_DIR}
OUT=${OUT:-outputs/gpu-probe}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
python3 -m helpers.local_models "$MODEL" --shape llama-8b --prequantized > "$OUT/build.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout "${PROBE_S:-330}" python3 bench/speed.py --model "$MODEL" --out "$OUT/steps.json" \
  --configs fast-flash fast-padded-flash --steps 4 --warmup 2 --longest --profile "$OUT/profile" \
  --job-timeout 150 > "$OUT/steps.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout "${PROBE_S:-330}" python3 bench/speed.py --model "$MODEL" --out "$OUT/longest.json" \
  --configs fast-flash-no-offload --steps 4 --warmup 2 --longest 40960 49152 65536 81920 98304 \
  --longest-modes tiled-patched --job-timeout 180 > "$OUT/longest.txt" 2>&1 &
wait
tar czf "$OUT/profile.tar.gz" -C "$OUT" profile && rm -r "$OUT/profile"
tail -n 12 "$OUT"/*.txt
