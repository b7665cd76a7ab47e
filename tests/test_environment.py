"""What the machine report says."""
from __future__ import annotations

import helpers.environment as environment


def test_the_report_says_whether_a_token_is_present_never_what_it_is(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_for_this_test")
    report = environment.environment_report()
    assert report["hf_token_present"] is True
    assert "hf_secret_value_for_this_test" not in environment.environment_markdown(report)
