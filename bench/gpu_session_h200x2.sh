#!/usr/bin/env bash
# Everything this kit measures on a two-GPU CUDA machine, meant to be started in the background (setsid) so that it
# outlives one device call. Phases (default all): build (the 8B stand-in pre-quantized in 4-bit), colab (the Colab T4
# path on GPU 0: bench/gpu_colab_t4.sh) beside one (the one-GPU run of bench/gpu_two_gpus.sh on GPU 1), then speed
# (bench/gpu_speed.sh on GPU 1) and two (the two-GPU runs and the comparison).
# Logs and a DONE marker go to outputs/gpu-logs/. Usage: setsid bash bench/gpu_session_h200x2.sh [phases] &
set -uo pipefail
PHASES=${1:-build colab one speed two}
# Named like the checkpoint of record, its 16-bit original beside it (see bench/gpu_colab_t4.sh).
MODEL=unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit
LOGS=outputs/gpu-logs
mkdir -p "$LOGS"
rm -f "$LOGS/DONE"
{
  date -u +"start %FT%TZ: $PHASES"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  if [[ $PHASES == *build* ]]; then
    python3 bench/standin.py "$MODEL" \
      --sixteen-bit unsloth/DeepSeek-R1-Distill-Llama-8B > "$LOGS/build.log" 2>&1
    echo "build exit $?"; du -sh "$MODEL"; date -u +"%T built"
  fi
  pids=()
  if [[ $PHASES == *colab* ]]; then
    CUDA_VISIBLE_DEVICES=0 bash bench/gpu_colab_t4.sh > "$LOGS/colab_t4.log" 2>&1 &
    pids+=($!)
  fi
  (
    if [[ $PHASES == *one* ]]; then
      CUDA_VISIBLE_DEVICES=1 bash bench/gpu_two_gpus.sh "$MODEL" one > "$LOGS/one_gpu.log" 2>&1
      echo "one_gpu exit $?"; date -u +"%T one_gpu done"
    fi
    if [[ $PHASES == *speed* ]]; then
      CUDA_VISIBLE_DEVICES=1 OUT="$LOGS/speed" bash bench/gpu_speed.sh "$MODEL" > "$LOGS/speed.log" 2>&1
      echo "speed exit $?"; date -u +"%T speed done"
    fi
  ) &
  pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid"; echo "phase $pid exit $?"; done
  date -u +"%T parallel phases done"
  if [[ $PHASES == *two* ]]; then
    bash bench/gpu_two_gpus.sh "$MODEL" "two report" > "$LOGS/two_gpus.log" 2>&1
    echo "two_gpus exit $?"; date -u +"%T two_gpus done"
  fi
} > "$LOGS/session.log" 2>&1
touch "$LOGS/DONE"
