#!/usr/bin/env bash
# Everything this kit measures on a two-GPU CUDA machine, started in the background so that it outlives one device
# call: the pre-quantized 8B stand-in, then at once the Colab T4 path on GPU 0 (bench/gpu_colab_t4.sh) and the speed
# benchmark with the GPU tests on GPU 1 (bench/gpu_speed.sh), then one GPU against two (bench/gpu_two_gpus.sh).
# Logs and a DONE marker go to outputs/gpu-logs/. Usage: setsid bash bench/gpu_session_h200x2.sh &
set -uo pipefail
MODEL=outputs/_models/llama8b-bnb-4bit
LOGS=outputs/gpu-logs
mkdir -p "$LOGS"
{
  date -u +"start %FT%TZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m helpers.local_models "$MODEL" --shape llama-8b --prequantized > "$LOGS/build.log" 2>&1
  echo "stand-in built: $?"; du -sh "$MODEL"; date -u +"%T built"
  CUDA_VISIBLE_DEVICES=0 bash bench/gpu_colab_t4.sh "$MODEL" > "$LOGS/colab_t4.log" 2>&1 &
  colab=$!
  CUDA_VISIBLE_DEVICES=1 bash bench/gpu_speed.sh "$MODEL" "$LOGS" > "$LOGS/speed.log" 2>&1 &
  speed=$!
  wait $colab; echo "colab_t4 exit $?"; date -u +"%T colab_t4 done"
  wait $speed; echo "speed exit $?"; date -u +"%T speed done"
  bash bench/gpu_two_gpus.sh "$MODEL" > "$LOGS/two_gpus.log" 2>&1
  echo "two_gpus exit $?"; date -u +"%T two_gpus done"
} > "$LOGS/session.log" 2>&1
touch "$LOGS/DONE"
