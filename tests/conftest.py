"""Shared fixtures: one run of the whole notebook pipeline on the tiny profile, reused by the notebook tests, and one
short SFT run of SmolLM2-135M-Instruct, reused by the real-model tests (evaluation, DPO, GGUF)."""
from __future__ import annotations

import os
import secrets

import pytest

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """run_dir of setup -> train -> inference executed through papermill on the cpu_tiny profile."""
    from helpers.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny-run"
    return run_pipeline("cpu_tiny", {**TINY_RUN, "run_dir": str(run_dir)})


@pytest.fixture(scope="session")
def chat_run(tiny_run, tmp_path_factory):
    """run_dir of train -> inference -> evaluate on the tiny profile in chat mode with loss on responses only."""
    from helpers.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("pipeline") / "chat-run"
    overrides = {"run_dir": str(run_dir), "prompt_template": "chat", "train_on_responses_only": True,
                 "system_prompt": "Answer like a warm friend."}
    return run_pipeline("cpu_tiny", overrides, ("01_train_lora", "02_inference", "03_evaluate"))


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

    run_dir = tmp_path_factory.mktemp("real") / "sft"
    return run_pipeline("cpu_smollm2", {**SMOLLM2_SFT, "run_dir": str(run_dir)}, ("00_setup", "01_train_lora"))
