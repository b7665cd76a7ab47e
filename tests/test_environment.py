"""What the machine report and the Colab install do."""
from __future__ import annotations

import helpers.environment as environment


def test_colab_install_keeps_colabs_torch_and_installs_every_other_pin(monkeypatch):
    calls = []
    monkeypatch.setattr(environment, "in_colab", lambda: True)
    monkeypatch.setattr(environment.subprocess, "run", lambda args, check: calls.append(args))
    environment.install_requirements()
    (args,) = calls
    pins = [a for a in args if "==" in a]
    assert not any(p.startswith(("torch==", "torchvision==")) for p in pins)
    assert "unsloth==2026.10.9" in pins and "trl==1.15.0" in pins and "transformers==5.17.0" in pins
    assert args[-2:] == ["-e", str(environment.PROJECT_ROOT)]


def test_outside_colab_nothing_is_installed(monkeypatch):
    monkeypatch.setattr(environment, "in_colab", lambda: False)
    monkeypatch.setattr(environment.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    environment.install_requirements()


def test_the_report_says_whether_a_token_is_present_never_what_it_is(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_for_this_test")
    report = environment.environment_report()
    assert report["hf_token_present"] is True
    assert "hf_secret_value_for_this_test" not in environment.report_markdown(report)
