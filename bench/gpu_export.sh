#!/usr/bin/env bash
# On a CUDA machine, after bench/gpu_pipeline.sh (a 4-bit run of the 8B architecture, its base model still at the
# path the run recorded): export that run as a LoRA adapter, merged 16-bit (unsloth's GPU save dequantizes the
# 4-bit base by merging into the original 16-bit weights) and merged 4-bit, reload each, compare its greedy answer
# with the tuned model's, and print the manifest. Needs about 25 GB free disk beside the run.
# Usage: bash bench/gpu_export.sh [run_dir]
set -euo pipefail
RUN=${1:-outputs/gpu-t4-standin}
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
status=0
python3 -m papermill notebooks/04_export.ipynb "$RUN/04_export.ipynb" -p run_dir "$RUN" \
  -y '{formats: [lora, merged_16bit, merged_4bit]}' --cwd "$PWD" || status=$?
python3 - "$RUN/export/manifest.json" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
print("expected:", repr(manifest["check"]["expected_answer"]))
for name, e in manifest["formats"].items():
    r = e.get("reload", {})
    print(f"{name:13} {e['status']:8} {e.get('total_bytes', 0) / 2**30:7.2f} GiB {e.get('seconds', '')!s:>7} s "
          f"loaded={r.get('loaded')} same_answer={r.get('same_answer')} {e.get('reason') or r.get('error') or repr(r.get('answer'))}")
PY
cat "$RUN/export/manifest.json"
exit "$status"
