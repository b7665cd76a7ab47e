"""Shared fixtures: one run of the whole notebook pipeline on the tiny profile, reused by the notebook tests."""
from __future__ import annotations

import os
import secrets

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
# A random token for the whole session: no file a run writes may contain it (see test_secrets.py).
HF_TOKEN_SENTINEL = "hf_" + secrets.token_hex(16)
os.environ["HF_TOKEN"] = HF_TOKEN_SENTINEL


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """run_dir of setup -> train -> inference executed through papermill on the cpu_tiny profile."""
    from helpers.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny-run"
    return run_pipeline("cpu_tiny", {"run_dir": str(run_dir)})
