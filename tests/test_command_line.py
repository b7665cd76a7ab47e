"""The command-line entry points refuse a bad profile, plan or parameter as argparse refuses bad arguments: one
`error:` line on stderr, exit status 2, no traceback, and before unsloth loads (it prints a banner on import)."""
from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("module", ["helpers.pipeline", "helpers.train"])
@pytest.mark.parametrize("args, message", [
    (["--profile", "cpu_tny"], "profile 'cpu_tny' is unknown; choose one of: colab_t4, "),
    (["--profile", "cpu_tiny", "-p", "max_stepz", "3"], "unknown parameter(s): 'max_stepz' (did you mean 'max_steps'?)"),
    (["--profile", "cpu_tiny", "-p", "learning_rate", "5"], "learning_rate = 5.0 is invalid; it must be a number"),
    (["--profile", "cpu_tiny", "-p", "max_steps", "[1,"], "-p max_steps '[1,' is not a YAML value"),
])
def test_a_bad_profile_or_parameter_is_one_error_line_and_exit_status_2(module, args, message):
    done = _run(module, *args)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"python -m {module}: error: ") and message in done.stderr
    assert done.stdout == ""  # nothing ran, not even unsloth's import


@pytest.mark.parametrize("plan, message", [
    ("no_such_plan", "batch plan 'no_such_plan' does not exist; shipped plans: "),
    ("bad_profile", "profile 'cpu_tny' is unknown"),
    ("bad_value", "point 'r0' {'lora_r': 0}: lora_r = 0 is invalid"),
])
def test_a_bad_batch_plan_is_one_error_line_and_exit_status_2(tmp_path, plan, message):
    (tmp_path / "bad_profile.yaml").write_text("profile: cpu_tny\n")
    (tmp_path / "bad_value.yaml").write_text("profile: cpu_tiny\ngrid:\n  lora_r: [0, 8]\n")
    path = tmp_path / f"{plan}.yaml" if plan != "no_such_plan" else plan
    done = _run("helpers.batch", str(path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("python -m helpers.batch: error: ") and message in done.stderr
    assert done.stdout == ""
