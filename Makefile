# `make demo`: set up .venv if missing or stale, then run setup -> train -> inference through papermill
# (the offline tiny profile without a GPU, the Colab T4 recipe with one). `make test`: the test suite.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := $(shell grep -E '^(torch|torchvision)==' requirements.txt)

.PHONY: demo test test-fast batch venv clean-outputs
.DEFAULT_GOAL := demo

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, so that no later requirement pulls in another build of it
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m helpers.pipeline

PLAN ?= notebooks/plans/cpu_tiny_grid.yaml
batch: $(STAMP)
	$(PY) -m helpers.batch $(PLAN)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not notebook"

clean-outputs:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
