"""The Hub token never lands in a file a run writes (executed notebooks included)."""
from __future__ import annotations

import pytest

from helpers.paths import PROJECT_ROOT
from tests.conftest import assert_token_in_no_file


@pytest.mark.notebook
def test_the_token_is_in_no_file_a_run_wrote(tiny_run):
    assert assert_token_in_no_file(tiny_run, PROJECT_ROOT / "outputs") > 10
    setup = (tiny_run / "00_setup.ipynb").read_text()
    assert "hf_token_present | True" in setup, "the setup notebook should say a token is present"


@pytest.mark.notebook
def test_the_token_is_in_no_file_a_dpo_run_wrote(dpo_run):
    assert assert_token_in_no_file(dpo_run) > 10  # 06 and 03 executed, adapter, checkpoints, logs, plots
