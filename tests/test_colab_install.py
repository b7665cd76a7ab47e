"""The Colab install replayed on a fake Colab with pip's dry run: Colab's torch stack and kernel stay, and everything
the notebooks need comes at the kit's pins, consistent with what is there. Needs PyPI (pip reads the packages'
metadata)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import install

SNAPSHOTS = Path(__file__).parent / "fake_colab"


def fake_colab(root: Path, freeze: Path) -> tuple[Path, Path]:
    """A venv (its interpreter, its site-packages) in which Colab's packages from freeze are installed distributions
    as far as pip can tell (metadata only: pip decides from it, nothing imports them), and google.colab imports."""
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for line in freeze.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            info = site / f"{name.replace('-', '_')}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (info / "INSTALLER").write_text("pip\n")
            (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
    (site / "google" / "colab").mkdir(parents=True)
    (site / "google" / "colab" / "__init__.py").write_text("")
    return python, site


@pytest.mark.network
@pytest.mark.parametrize("snapshot", ["2026-02-13", "2026-08-19"])  # torch 2.9.0+cu128, torch 2.11.0+cu128
def test_colab_install_keeps_colabs_torch_and_kernel_and_installs_every_pin(snapshot, tmp_path):
    python, site = fake_colab(tmp_path / "colab", SNAPSHOTS / f"pip-freeze-{snapshot}.txt")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    colab = install.installed_versions([str(site)])
    listed = json.loads(subprocess.run([*pip, "list", "--format", "json"], capture_output=True, text=True,
                                       check=True).stdout)
    assert {canonicalize_name(d["name"]): d["version"] for d in listed}["torch"] == colab["torch"]  # pip sees the fake
    subprocess.run([python, "-c", "import google.colab"], check=True)

    commands = install.colab_install_commands(tmp_path / "kept.txt", pip, [str(site)])
    reports = []
    for step, command in enumerate(commands):
        report = tmp_path / f"report-{step}.json"
        subprocess.run([*command, "--dry-run", "--quiet", "--report", str(report)], check=True)
        reports.append(json.loads(report.read_text()))
    new = {canonicalize_name(item["metadata"]["name"]): item["metadata"] for r in reports for item in r["install"]}

    kept = {canonicalize_name(name) for name in install.KEPT} & colab.keys()
    assert {"torch", "torchvision", "torchaudio", "triton", "ipykernel", "tornado", "pyzmq", "numpy"} <= kept
    assert not kept & new.keys(), "the install would replace Colab's " + ", ".join(sorted(kept & new.keys()))
    after = {**colab, **{name: meta["version"] for name, meta in new.items()}}
    pins = {name: next(iter(Requirement(pin).specifier)).version
            for name, pin in install.pinned("requirements.txt").items()}
    needed = {"unsloth", "unsloth-zoo", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"}
    assert needed <= pins.keys()
    for name in pins.keys() - {"torch", "torchvision"}:
        assert after[name] == pins[name], name
    assert after["torchao"] == install.torchao_for(colab["torch"])
    assert after["xformers"] == install.xformers_for(colab["torch"]) is not None

    # What `pip check` would say afterwards: every requirement of what the install brings (unsloth's and unsloth_zoo's
    # too, installed without dependencies) is met by what is then installed.
    environment = {**reports[0]["environment"], "extra": ""}
    unmet = []
    for name, meta in new.items():
        for line in meta.get("requires_dist", []):
            need = Requirement(line)
            if need.marker is None or need.marker.evaluate(environment):
                have = after.get(canonicalize_name(need.name))
                if have is None or not need.specifier.contains(have, prereleases=True):
                    unmet.append(f"{name} needs {need}, has {have}")
    assert not unmet, unmet



@pytest.mark.network
def test_a_colab_torch_unsloth_does_not_support_stops_the_install_instead_of_being_replaced(tmp_path):
    freeze = tmp_path / "pip-freeze.txt"  # a Colab that ships torch 2.15.0; unsloth 2026.10.9 declares torch<2.15
    colab = (SNAPSHOTS / "pip-freeze-2026-08-19.txt").read_text()
    freeze.write_text(colab.replace("torch==2.11.0+cu128", "torch==2.15.0"))
    python, site = fake_colab(tmp_path / "colab", freeze)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    first = install.colab_install_commands(tmp_path / "kept.txt", pip, [str(site)])[0]
    result = subprocess.run([*first, "--dry-run", "--quiet", "--report", str(tmp_path / "report.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and not (tmp_path / "report.json").exists()
    assert "Cannot install torch<2.15.0" in result.stderr and "ResolutionImpossible" in result.stderr

def test_a_restart_is_asked_for_exactly_when_something_imported_changed(monkeypatch, caplog):
    states = iter([{"numpy": "2.0.2", "certifi": "2026.1.4", "transformers": "5.0.0"},
                   {"numpy": "2.0.2", "certifi": "2026.10.19", "transformers": "5.17.0", "trl": "1.15.0"}])
    monkeypatch.setattr(install, "installed_versions", lambda path=None: next(states))
    monkeypatch.setattr(install, "colab_install_commands", lambda constraints: [["pip", "one"], ["pip", "two"]])
    ran = []
    monkeypatch.setattr(install.subprocess, "run", lambda command, **kw: ran.append(command) or
                        subprocess.CompletedProcess(command, 0, "", ""))
    monkeypatch.setattr(install, "imported_distributions", lambda: {"numpy", "certifi", "trl"})
    monkeypatch.setattr(install.log, "handlers", [logging.NullHandler()])  # caplog hears it through the root logger
    with caplog.at_level(logging.INFO, logger=install.log.name):
        install.install_on_colab()
    assert ran == [["pip", "one"], ["pip", "two"]]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # certifi was imported and upgraded; numpy was imported but kept; trl is new; transformers was never imported
    assert "RESTART NEEDED: certifi 2026.1.4 -> 2026.10.19 changed" in warning and "transformers" not in warning


def test_nothing_runs_when_every_pin_is_already_installed(monkeypatch):
    pins = {name: next(iter(Requirement(pin).specifier)).version
            for name, pin in install.pinned("requirements.txt").items()}
    monkeypatch.setattr(install, "installed_versions", lambda path=None: pins)
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    install.install_on_colab()


def test_a_failed_pip_run_shows_pips_own_reason():
    # A stand-in for pip that fails as pip does: its reason on stderr, exit status 1.
    pip = [sys.executable, "-c", "import sys; print('Looking in indexes: https://pypi.org/simple'); "
           "sys.exit('ERROR: No matching distribution found for unsloth==2099.1.1')"]
    with pytest.raises(RuntimeError) as failure:
        install.unsloth_needs(["unsloth==2099.1.1"], pip)
    assert "pip could not read the metadata of unsloth==2099.1.1 (exit status 1)" in str(failure.value)
    assert "ERROR: No matching distribution found for unsloth==2099.1.1" in str(failure.value)
