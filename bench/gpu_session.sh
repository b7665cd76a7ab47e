#!/usr/bin/env bash
# "On the GPU, measured together": one prepared script, three calls of under 10 minutes on the offline GPU machine,
# each a phase that writes what it measured under outputs/gpu-session/<phase> as it goes, packed into $OUT at its end
#   A  the 8B stand-in (bench/standin.py, into the Hugging Face cache under the real ids, its 16-bit original too);
#      colab_end_to_end at real scale with micro_batching="auto" (bench/whole_run.py); llama.cpp built meanwhile;
#      the memory limit shown to work (a 400 MiB allocation under 200 MiB is killed, 100 MiB completes); then the
#      merged_16bit export of that run in a process held to a free Colab's 12.7 GB (bench/memory_limit.py).
#   B  the same whole run with micro_batching="recipe"; then `pytest -m gpu` (the equality test on varied lengths).
#   C  gguf q4_k_m of the auto run under 12.7 GB (converted from its merged_16bit export); then bench/speed.py's four
#      configurations interleaved, each run in its own process, as many rounds as the time left holds.
#   M  the exports alone: merged_16bit, then gguf q4_k_m from it, each under 12.7 GB, llama.cpp built meanwhile.
# The limited exports export phase A's whole run where it is there, else a 2-step run of the same model and LoRA on
# the bundled sample (a merge's memory does not depend on how long the adapter trained): C and M need no A.
# A later phase on the same warm machine reuses what an earlier one left (the stand-in, llama.cpp, the runs); on a
# fresh machine it makes them again. Prepare here (see docs/performance.md, "Measuring on the GPU"):
#   bash ../shared/gpu/make_site.sh && python -m helpers.llama_cpp pack --out .whl/llama.cpp-source.tar.xz
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#       quicktok-v1==0.4.0
# Usage (on the GPU machine, carry .whl): bash bench/gpu_session.sh A|B|C|M
set -uo pipefail
PHASE=${1:?usage: bash bench/gpu_session.sh A|B|C|M}
BUDGET=${BUDGET:-560}  # seconds this phase may run: the call's limit is 600
START=$SECONDS
WORK=outputs/gpu-session/$PHASE  # what the phase writes; packed into $OUT (the device's folder that comes back)
MODEL=unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit
SIXTEEN=unsloth/DeepSeek-R1-Distill-Llama-8B
LIMIT=12.7GB  # a free Colab's memory
T4=(-p precision fp16 -p max_gpu_memory_gib 15)
mkdir -p "$WORK"
# shellcheck disable=SC2154
# at the end, or when the call's limit cuts a phase short: the runs' records too (their stages so far)
pack() {
  for record in outputs/whole-run-*/run.json; do
    [ -f "$record" ] && cp "$record" "$WORK/$(basename "$(dirname "$record")").run.json"
  done
  [ -n "${OUT:-}" ] && tar czf "$OUT/phase-$PHASE.tgz" -C "$WORK" . && cp "$WORK/phase-$PHASE.log" "$OUT/"
}
trap pack EXIT
left() { local seconds=$((BUDGET - (SECONDS - START))); echo $((seconds > 1 ? seconds : 1)); }
say() { echo "[$((SECONDS - START)) s] $*" | tee -a "$WORK/phase-$PHASE.log"; }

# The packages the machine lacks, and where things go: the stand-in into a Hugging Face cache in memory (21 GB; the
# 64 GB disk keeps room for the 16 GB merge and the GGUFs), llama.cpp's tools into outputs/ (kept while warm).
if [ ! -d /tmp/site/unsloth ]; then
  mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/quicktok*.whl
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1
export HF_HUB_CACHE=/dev/shm/hf-cache LORA_KIT_LLAMA_CPP=$PWD/outputs/_tools/llama.cpp
export LORA_KIT_LLAMA_CPP_SOURCE=$PWD/.whl/llama.cpp-source.tar.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$WORK/phase-$PHASE.log"

standin() {  # skipped when built already (its stamp)
  say "stand-in"
  timeout 300 python3 bench/standin.py --hub-cache "$MODEL" --sixteen-bit "$SIXTEEN" > "$WORK/standin.txt" 2>&1 \
    || { tail -20 "$WORK/standin.txt"; say "stand-in failed"; exit 1; }
  say "stand-in ready"
}

whole_run() {  # $1: auto or recipe
  say "whole run, micro_batching=$1"
  timeout "$(left)" python3 bench/whole_run.py --model "$MODEL" --modes "$1" --out "$WORK/whole_run_$1.json" 2>&1 \
    | grep -v -E "it/s\]|s/it\]|Executing" > "$WORK/whole_run_$1.txt"
  tail -n 22 "$WORK/whole_run_$1.txt"
  say "whole run $1 done"
}

export_run() {  # the run the limited exports export: phase A's whole run, else (a fresh machine) a 2-step one
  # of the same model, LoRA and recipe: a merge's memory and time do not depend on how long the adapter trained
  if [ -f outputs/whole-run-auto/adapter/adapter_model.safetensors ]; then echo outputs/whole-run-auto; return; fi
  [ -f outputs/export-run/adapter/adapter_model.safetensors ] || timeout 200 python3 -m helpers.pipeline \
    --profile colab_t4 --notebooks 01_train_lora -p run_dir outputs/export-run "${T4[@]}" -p max_steps 2 \
    -p dataset helpers/data/sample_dpo.jsonl > "$WORK/export_run.txt" 2>&1
  echo outputs/export-run
}

limited_export() {  # $1: seconds, $2: format, then -p overrides; 04_export of export_run's run under $LIMIT
  local seconds=$1 format=$2; shift 2
  local run; run=$(export_run)
  say "$format under $LIMIT ($(df -h --output=avail . | tail -1) free on disk)"
  timeout "$seconds" python3 bench/memory_limit.py "$LIMIT" -- python3 -m helpers.pipeline --profile colab_t4 \
    --notebooks 04_export -p run_dir "$run" "${T4[@]}" -p formats "[$format]" "$@" \
    > "$WORK/limit_$format.txt" 2>&1
  tail -n 1 "$WORK/limit_$format.txt" | tee -a "$WORK/phase-$PHASE.log"
  python3 - "$format" "$WORK/export_$format.json" "$run" <<'PY' | tee -a "$WORK/phase-$PHASE.log"
import json, sys
name, out, run = sys.argv[1:]
manifest = json.load(open(f"{run}/export/manifest.json"))
entry = manifest["formats"].get(name, {})
json.dump(entry, open(out, "w"), indent=2)
print(f"{name}: {entry.get('status')} {entry.get('total_bytes', 0) / 2**30:.2f} GiB in {entry.get('seconds')} s; "
      f"written {entry.get('memory_while_written')}; checked {entry.get('memory_while_checked')}; "
      f"{entry.get('reason') or ''}")
PY
  say "$format of $run: disk now $(du -sh "$run/export" | cut -f1) of exports"
}

case $PHASE in
A)
  (nice -n 10 python3 -m helpers.llama_cpp build --jobs 8 > "$WORK/llama_cpp_build.txt" 2>&1 &)
  standin
  whole_run auto
  say "the memory limit, shown to work"
  python3 bench/memory_limit.py 200MiB -- python3 -c "bytearray(400 * 2**20)" > "$WORK/limit_proof.txt" 2>&1
  python3 bench/memory_limit.py 200MiB -- python3 -c "bytearray(100 * 2**20)" >> "$WORK/limit_proof.txt" 2>&1
  tail -n 2 "$WORK/limit_proof.txt" | tee -a "$WORK/phase-$PHASE.log"
  limited_export "$(left)" merged_16bit
  ;;
B)
  standin
  whole_run recipe
  say "pytest -m gpu"
  KIT_GPU_MODEL=$(python3 -c "from huggingface_hub import snapshot_download as s; print(s('$MODEL'))") \
    KIT_GPU_REPORT="$WORK/gpu_equality.json" timeout "$(left)" python3 -m pytest -m gpu -v -p no:cacheprovider \
    2>&1 | grep -v -E "it/s\]|s/it\]" > "$WORK/pytest_gpu.txt"
  tail -n 12 "$WORK/pytest_gpu.txt"
  ;;
C)
  standin
  python3 -m helpers.llama_cpp build --jobs "$(nproc)" > "$WORK/llama_cpp_build.txt" 2>&1
  limited_export 240 gguf -p gguf_quantization q4_k_m
  rm -rf "$(export_run)/export/gguf"  # 5 GB; its figures are in the manifest
  say "speed: rounds of tutorial, fast, packed-8k, hf-tutorial, each in its own process"
  SNAPSHOT=$(python3 -c "from huggingface_hub import snapshot_download as s; print(s('$MODEL'))")
  round=0
  while [ "$(left)" -gt 200 ]; do
    round=$((round + 1))
    timeout "$(left)" python3 bench/speed.py --model "$SNAPSHOT" --out "$WORK/speed_round$round.json" --steps 4 \
      --warmup 2 --longest --job-timeout 110 > "$WORK/speed_round$round.txt" 2>&1
    say "speed round $round: $(grep -c tokens_per_s "$WORK/speed_round$round.json" 2>/dev/null) configurations"
  done
  python3 - "$WORK" <<'PY' | tee "$WORK/speed_medians.txt"
import glob, json, sys
sys.path.insert(0, "bench")
from speed import medians_table
results = [r for path in sorted(glob.glob(f"{sys.argv[1]}/speed_round*.json")) for r in json.load(open(path))]
print(medians_table(results))
PY
  ;;
M)
  python3 -m helpers.llama_cpp build --jobs 8 > "$WORK/llama_cpp_build.txt" 2>&1 &
  BUILD=$!
  standin
  limited_export 300 merged_16bit
  wait "$BUILD"
  limited_export "$(left)" gguf -p gguf_quantization q4_k_m
  ;;
*)
  echo "unknown phase $PHASE; choose one of: A, B, C, M"; exit 2
  ;;
esac
say "phase $PHASE done"
