#!/usr/bin/env bash
# Colab-sized exports of the 8B stand-in (issue #29): merged_16bit, then gguf q4_k_m, each exported by the kit in a
# process held to a free Colab's 12.7 GB of memory by a memory cgroup (bench/memory_limit.py: v1 or v2, as root),
# on a CUDA machine standing in for a T4 (fp16, GPU memory capped at 15 GiB). Prints for each: completed or not,
# peak anonymous memory and peak RSS (the cgroup's and the command's, from the kernel; the kit's own MemoryWatch
# from the manifest, for the merge and for the reload checks apart), its time, and the disk it used.
#
# The GPU machine has no network: llama.cpp's tools are built there from the trimmed source carried with the
# checkout, made here first (5.5 MB):
#   python -m helpers.llama_cpp pack --out .whl/llama.cpp-source.tar.xz && bash ../shared/gpu/make_site.sh
# and carried with .whl (site.tar.xz, 22 MB). cmake and a C++ compiler must be on that machine; where cmake is
# not, a cmake wheel in .whl (pip download cmake --only-binary :all: -d .whl, 30 MB) is unpacked and used.
#
# Each phase is one call, under 10 minutes; later phases reuse what earlier ones left in outputs/:
#   bash bench/gpu_export_colab_memory.sh prepare       # build the tools (timed), the stand-in, a 2-step run
#   bash bench/gpu_export_colab_memory.sh merged_16bit  # under 12.7 GB; the export is then deleted (disk)
#   bash bench/gpu_export_colab_memory.sh gguf          # q4_k_m under 12.7 GB
set -euo pipefail
PHASE=${1:?usage: bash bench/gpu_export_colab_memory.sh prepare|merged_16bit|gguf}
LIMIT=${LIMIT:-12.7GB}  # a free Colab's RAM
RUN=outputs/gpu-colab-memory
MODEL=unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit
T4="-p precision fp16 -p max_gpu_memory_gib 15"
mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1
export LORA_KIT_LLAMA_CPP=$PWD/outputs/_tools/llama.cpp LORA_KIT_LLAMA_CPP_SOURCE=$PWD/.whl/llama.cpp-source.tar.xz
if ! command -v cmake >/dev/null && ls .whl/cmake-*.whl >/dev/null 2>&1; then
  python3 -c "import zipfile, glob; zipfile.ZipFile(sorted(glob.glob('.whl/cmake-*.whl'))[-1]).extractall('/tmp/cmake')"
  chmod +x /tmp/cmake/cmake/data/bin/*
  export PATH=/tmp/cmake/cmake/data/bin:$PATH
fi
TIMEFORMAT='%R s wall, %U s user + %S s system CPU'

disk() { echo "disk: $(du -sh "$RUN/export" 2>/dev/null | cut -f1) in $RUN/export; $(df -h --output=avail . | tail -1) free"; }

limited_export() {  # the 04_export notebook in a process under $LIMIT, then what it recorded
  local format=$1; shift
  echo "== $format under $LIMIT"; disk
  local status=0
  # shellcheck disable=SC2086
  time python3 bench/memory_limit.py "$LIMIT" -- python3 -m helpers.pipeline --profile colab_t4 --notebooks 04_export \
    -p run_dir "$RUN" $T4 -p formats "[$format]" "$@" | tee "$RUN/limit-$format.json" \
    || status=$?
  disk
  python3 - "$RUN" "$format" <<'PY'
import json, sys
run, name = sys.argv[1:]
limit = json.loads(open(f"{run}/limit-{name}.json").read().strip().splitlines()[-1])
print(f"cgroup: completed={limit.get('completed')} killed_by={limit.get('killed_by')} oom_kills={limit.get('oom_kills')} "
      f"peak anon {limit.get('peak_anon_gib')} GiB, peak usage {limit.get('peak_group_usage_gib')} GiB (page cache "
      f"included), command peak RSS {limit.get('peak_rss_gib_of_command')} GiB, {limit.get('seconds')} s; {limit.get('how')}")
try:
    e = json.load(open(f"{run}/export/manifest.json"))["formats"][name]
except (OSError, KeyError) as error:
    sys.exit(f"no manifest entry for {name}: {error}")
print(f"kit: status={e['status']} {e.get('total_bytes', 0) / 2**30:.2f} GiB in {e.get('seconds')} s "
      f"{e.get('reason') or ''}")
for key in ("memory_so_far", "memory_while_written", "memory_while_checked", "memory", "steps", "reload", "llama_cpp"):
    if key in e:
        print(f"  {key}: {json.dumps(e[key])}")
PY
  return "$status"
}

case $PHASE in
prepare)
  command -v cmake && command -v c++ || { echo "cmake or c++ missing: llama.cpp cannot be built here"; exit 1; }
  echo "== llama.cpp tools from the carried source, $(nproc) cores"
  time python3 -m helpers.llama_cpp build --jobs "$(nproc)"
  cat "$LORA_KIT_LLAMA_CPP/build.json"
  echo "== the 8B stand-in, pre-quantized, its 16-bit original beside it (unsloth merges merged_16bit from it)"
  time python3 -m helpers.local_models "$MODEL" --shape llama-8b --prequantized --sixteen-bit unsloth/DeepSeek-R1-Distill-Llama-8B
  echo "== a 2-step run to export"
  # shellcheck disable=SC2086
  time python3 -m helpers.pipeline --profile colab_t4 --notebooks 01_train_lora -p model_name "$MODEL" $T4 \
    -p dataset helpers/data/sample_dpo.jsonl -p max_steps 2 -p eval_fraction 0 -p save_steps 2 -p run_dir "$RUN" \
    -p overwrite true
  disk
  ;;
merged_16bit)
  limited_export merged_16bit || echo "merged_16bit did not complete under $LIMIT"
  rm -rf "$RUN/export/merged_16bit"  # 15 GB: the gguf phase needs the room (64 GB disk)
  ;;
gguf)
  limited_export gguf -p gguf_quantization q4_k_m || echo "gguf q4_k_m did not complete under $LIMIT"
  ;;
*)
  echo "unknown phase $PHASE; choose one of: prepare, merged_16bit, gguf"; exit 2
  ;;
esac
