"""Shared fixtures: one run of the whole notebook pipeline on the tiny profile, reused by the notebook tests, and one
short SFT run of SmolLM2-135M-Instruct, reused by the real-model tests (evaluation, DPO, GGUF).

`make test` runs the suite on two workers (pytest-xdist, --dist loadfile: a module's tests on one worker, so that
its module fixtures are made once). The shared runs are made once for both workers (shared_run: the first to ask
makes it, the other waits for it) and only read: a test that writes runs on a copy. Each worker's torch takes its
share of the cores, not all of them (two workers each spinning two threads on two cores run several times slower)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # before torch is imported: the kernels the tests start inherit it
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
# A random token for the whole session: no file a run writes may contain it (see test_secrets.py).
HF_TOKEN_SENTINEL = "hf_" + secrets.token_hex(16)
# The real-model SFT run: the cpu_smollm2 profile's recipe, fewer rows and steps, so the tier stays within a few
# minutes on two cores.
SMOLLM2_SFT = {"max_steps": 12, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 2,
               "eval_steps": 12, "save_steps": 12}
os.environ["HF_TOKEN"] = HF_TOKEN_SENTINEL

import helpers.stack  # noqa: E402,F401  (unsloth before any test imports transformers, as in the notebooks)


def assert_token_in_no_file(*roots) -> int:
    """Fail naming the file if any file under roots holds the session's token; return how many were searched."""
    searched = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                searched += 1
                assert HF_TOKEN_SENTINEL.encode() not in path.read_bytes(), f"token leaked into {path}"
    return searched


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The offline tiny model's tokenizer, built locally."""
    from helpers.local_models import build_tokenizer

    return build_tokenizer()


# tiny_run's parameters besides the cpu_tiny profile: a subset of the 26 held-out rows scored while training
# (03_evaluate scores them all). A test that trains again to compare with tiny_run passes them too.
TINY_RUN = {"training_eval_rows": 8}


def shared_run(tmp_path_factory, name: str, make) -> Path:
    """run_dir `name`, made once for the session by make(run_dir), whichever worker asks first; the other workers
    wait for it and use the same folder (under xdist the workers' temporary folders share a parent)."""
    from helpers.local_models import one_builder

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    run_dir = root / "shared" / name
    made = run_dir.parent / f".{name}.made"
    with one_builder(run_dir):
        if not made.is_file():
            make(run_dir)
            made.touch()
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """run_dir of setup -> train -> inference executed through papermill on the cpu_tiny profile."""
    from helpers.pipeline import run_pipeline

    return shared_run(tmp_path_factory, "tiny-run",
                      lambda run_dir: run_pipeline("cpu_tiny", {**TINY_RUN, "run_dir": str(run_dir)}))


@pytest.fixture(scope="session")
def dpo_run(tiny_run, tmp_path_factory):
    """run_dir of DPO (06) continuing tiny_run's adapter for a few steps, then its evaluation (03)."""
    from helpers.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("pipeline") / "dpo-run"
    overrides = {"sft_run_dir": str(tiny_run), "run_dir": str(run_dir), "max_steps": 4, "eval_steps": 2,
                 "save_steps": 2, "max_new_tokens": 16}
    return run_pipeline("cpu_tiny_dpo", overrides, ("06_preference_dpo", "03_evaluate"))


@pytest.fixture(scope="session")
def smollm2_sft_run(tmp_path_factory):
    """run_dir of setup -> SFT of SmolLM2-135M-Instruct on cpu_smollm2 (SMOLLM2_SFT's short settings), through
    papermill; setup prepares the model once into outputs/_models."""
    from helpers.pipeline import run_pipeline

    return shared_run(tmp_path_factory, "smollm2-sft",
                      lambda run_dir: run_pipeline("cpu_smollm2", {**SMOLLM2_SFT, "run_dir": str(run_dir)},
                                                   ("00_setup", "01_train_lora")))
