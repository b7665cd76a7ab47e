#!/usr/bin/env bash
# A sweep on a machine with 2 or more CUDA GPUs: as many points as GPUs (learning rates) of the colab_t4 recipe on the
# 8B-shaped stand-in pre-quantized in 4-bit (fp16, the bundled sample data, STEPS steps, no held-out split), run one
# point at a time, then all at once through Ray, one GPU each (bench/sweep_speed.sh). Target: the parallel batch at
# >= 1.8x the sequential throughput on 2 GPUs. About 10 minutes on 2 GPUs with 60 steps: start it in the background,
#   setsid bash bench/gpu_sweep.sh > outputs/gpu-sweep.log 2>&1 &      then read outputs/gpu-sweep.log
# On the offline GPU machine ship .whl/site.tar.xz (bash ../shared/gpu/make_site.sh) and .whl/ray.tar.xz
# (bash bench/make_ray_site.sh) and the quicktok-v1 wheel with the checkout; this script unpacks them when the image
# lacks Ray or papermill.
# Usage: bash bench/gpu_sweep.sh [model_dir] [steps]
#   Tried on a CPU with the tiny model: GPUS=2 PROFILE=cpu_tiny PRECISION=fp32 bash bench/gpu_sweep.sh \
#   outputs/_models/tiny-llama 4   (PY=.venv/bin/python where python3 lacks the kit's packages)
set -euo pipefail
MODEL=${1:-unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit}
STEPS=${2:-60}
PROFILE=${PROFILE:-colab_t4}
PRECISION=${PRECISION:-fp16}
PY=${PY:-python3}
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('ray') and u.find_spec('papermill')))"; then
  mkdir -p /tmp/site
  for pack in .whl/site.tar.xz .whl/ray.tar.xz; do tar xJf "$pack" -C /tmp/site; done
  # the stand-in's tokenizer (bench/standin.py): pip download quicktok-v1==0.4.0 into .whl, as gpu_session.sh says
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/quicktok*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1 PY
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# a Hub id: the 8B stand-in, pre-quantized in 4-bit, into the Hugging Face cache under that id (skipped when there)
[[ -d $MODEL ]] || "$PY" bench/standin.py --hub-cache "$MODEL"
PLAN=outputs/gpu-sweep.yaml
"$PY" - "$PLAN" "$MODEL" "$STEPS" "$GPUS" "$PROFILE" "$PRECISION" <<'PY'
import sys, yaml
plan, model, steps, gpus, profile, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:]
spec = {"name": "gpu-sweep", "profile": profile, "notebooks": ["01_train_lora"],
        "fixed": {"model_name": model, "precision": precision, "dataset": "helpers/data/sample_dpo.jsonl",
                  "max_steps": steps, "save_steps": 20, "eval_fraction": 0.0},
        "grid": {"learning_rate": [round(2e-4 / 2 ** i, 8) for i in range(gpus)]}}
open(plan, "w").write(yaml.safe_dump(spec, sort_keys=False))
PY
cat "$PLAN"
bash bench/sweep_speed.sh "$PLAN" "$GPUS" outputs/gpu-sweep
