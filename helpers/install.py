"""The Colab install: the kit's pinned packages added around Colab's own torch stack and Jupyter kernel, which it keeps.

Colab's torch, torchvision, torchaudio and triton are built for its CUDA driver, and the running kernel imports
ipykernel, tornado, pyzmq and the rest: pip replacing any of them breaks the session. So the install pins them at their
installed versions (a constraints file: pip then stops with an error rather than replace one), installs unsloth and
unsloth_zoo without their dependencies (they declare torch, torchvision, xformers and triton), and lets pip resolve
everything else they and the notebooks need, with deps, under those pins. xformers comes only where a build declares
the installed torch.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

PIP = (sys.executable, "-m", "pip")
# Built by Colab for its CUDA driver; PyPI's builds are for another CUDA.
TORCH_STACK = ("torch", "torchvision", "torchaudio", "triton")
# The running kernel's packages: ipykernel and what it imports (its dependency closure on Colab: ipykernel 6.17,
# ipython 7.34, jupyter_client 7.4), the widgets Colab's front end renders, and google-colab itself.
KERNEL = ("ipykernel", "ipython", "jupyter-client", "jupyter-core", "traitlets", "tornado", "pyzmq", "comm", "debugpy",
          "matplotlib-inline", "nest-asyncio", "psutil", "packaging", "prompt-toolkit", "pygments", "jedi", "parso",
          "pexpect", "ptyprocess", "decorator", "pickleshare", "backcall", "wcwidth", "entrypoints", "python-dateutil",
          "six", "platformdirs", "setuptools", "ipywidgets", "widgetsnbextension", "jupyterlab-widgets", "google-colab")
# numpy too: Colab's compiled packages (pandas, scipy, scikit-learn...) are built against the one it ships.
KEPT = (*TORCH_STACK, *KERNEL, "numpy")
WITHOUT_DEPS = ("unsloth", "unsloth-zoo")
# 05_batch runs its points through papermill on Colab too; the pin is in requirements-dev.txt.
FROM_DEV = ("papermill",)
# xformers builds declare the one torch they were built for (their own Requires-Dist), up to 0.0.34 (torch 2.10.0);
# 0.0.35 declares torch>=2.10. Any other torch gets no xformers, and unsloth uses PyTorch's SDPA attention.
XFORMERS_BY_TORCH = {"2.8.0": "0.0.32.post2", "2.9.0": "0.0.33.post1", "2.9.1": "0.0.33.post2"}
XFORMERS_FROM_TORCH_2_10 = "0.0.35"


def xformers_for(torch_version: str) -> str | None:
    """The xformers release built for this torch, or None when there is none."""
    torch = Version(Version(torch_version).base_version)
    return XFORMERS_FROM_TORCH_2_10 if torch >= Version("2.10") else XFORMERS_BY_TORCH.get(str(torch))


def torchao_for(torch_version: str) -> str:
    """The torchao release that imports on this torch and that peft accepts.

    torchao declares no torch requirement, so pip cannot choose it: 0.17 and later load their kernels only on
    torch >= 2.11 and 0.18 imports torch names added in 2.10-2.11, while peft >= 0.19 refuses torchao < 0.16
    (Colab ships 0.10)."""
    return "0.18.0" if Version(Version(torch_version).base_version) >= Version("2.11") else "0.16.0"


def installed_versions(path: list[str] | None = None) -> dict[str, str]:
    """Installed distributions (normalized name -> version) on sys.path, or on path."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions(**({"path": path} if path else {})):
        if dist.metadata["Name"]:
            versions.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return versions


def pinned(requirements_file: str) -> dict[str, str]:
    """The pins of one of the kit's requirements files: normalized name -> 'name==version'."""
    lines = (PROJECT_ROOT / requirements_file).read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(pin.name): str(pin) for pin in pins}


def run_pip(command: Sequence[str], what: str) -> subprocess.CompletedProcess:
    """Run a pip command, its output captured; a failure raises RuntimeError with the end of pip's own output
    (its reason), not a bare exit status."""
    result = subprocess.run(list(command), capture_output=True, text=True)
    if result.returncode:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise RuntimeError(f"pip could not {what} (exit status {result.returncode}):\n" + "\n".join(output[-30:]))
    return result


def unsloth_needs(pins: list[str], pip: Sequence[str]) -> list[str]:
    """What the packages pinned in pins declare they need on the target interpreter, xformers and each other left out.

    pip reads their metadata (a dry run that installs nothing) and says which interpreter it targets; their markers
    are evaluated for that one."""
    report = json.loads(run_pip([*pip, "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed",
                                 "--report", "-", *pins], f"read the metadata of {', '.join(pins)}").stdout)
    environment = {**report["environment"], "extra": ""}
    needs = set()
    for item in report["install"]:
        for line in item["metadata"].get("requires_dist", []):
            need = Requirement(line)
            if canonicalize_name(need.name) in ("xformers", *WITHOUT_DEPS):
                continue
            if need.marker is None or need.marker.evaluate(environment):
                need.marker = None
                needs.add(str(need))
    return sorted(needs)


def colab_install_commands(constraints: Path, pip: Sequence[str] = PIP,
                           path: list[str] | None = None) -> list[list[str]]:
    """The Colab install's pip commands, in order, for the environment on path (default: this interpreter's).

    Writes the kept packages' installed versions to constraints, which the first command obeys."""
    installed = installed_versions(path)
    kept = {name: installed[name] for name in map(canonicalize_name, KEPT) if name in installed}
    if "torch" not in kept:
        raise RuntimeError("no torch is installed; the Colab install keeps Colab's torch and needs one")
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in kept.items()))
    runtime, dev = pinned("requirements.txt"), pinned("requirements-dev.txt")
    without_deps = [runtime[name] for name in WITHOUT_DEPS]
    with_deps = [pin for name, pin in runtime.items() if name not in (*TORCH_STACK, *WITHOUT_DEPS)]
    with_deps += [dev[name] for name in FROM_DEV] + unsloth_needs(without_deps, pip)
    with_deps.append(f"torchao=={torchao_for(kept['torch'])}")
    if xformers := xformers_for(kept["torch"]):
        with_deps.append(f"xformers=={xformers}")
    return [[*pip, "install", "--constraint", str(constraints), *with_deps],
            [*pip, "install", "--no-deps", *without_deps, "--editable", str(PROJECT_ROOT)]]


def imported_distributions() -> set[str]:
    """The installed distributions (normalized names) that provide a module this session has imported."""
    providers = metadata.packages_distributions()
    return {canonicalize_name(dist) for module in list(sys.modules) if "." not in module
            for dist in providers.get(module, ())}


def install_on_colab() -> None:
    """Install the kit's packages around Colab's torch stack and kernel; one line per phase, and a clear message
    when something this session had already imported changed (a restart is then needed)."""
    if not log.handlers:  # Colab shows no INFO logging by default
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    before = installed_versions()
    runtime = {name: Requirement(pin) for name, pin in pinned("requirements.txt").items() if name not in TORCH_STACK}
    if all(name in before and pin.specifier.contains(before[name]) for name, pin in runtime.items()):
        log.info("The kit's packages are already installed.")
        return
    started = time.perf_counter()
    kept = ", ".join(f"{name} {before[name]}" for name in TORCH_STACK if name in before)
    log.info("Installing the kit's packages, keeping Colab's %s and the Jupyter kernel's packages...", kept)
    with tempfile.TemporaryDirectory() as folder:
        commands = colab_install_commands(Path(folder) / "kept.txt")
        phases = ("transformers, trl, peft, datasets, bitsandbytes... and what they need",
                  "unsloth, unsloth_zoo and this kit (without dependencies)")
        for step, (phase, command) in enumerate(zip(phases, commands), start=1):
            log.info("[%d/%d] %s", step, len(commands), phase)
            run_pip(command, f"install {phase} around Colab's {kept} and kernel packages, which it must keep")
    after = installed_versions()
    changed = sorted(name for name in after if before.get(name) != after[name])
    imported = imported_distributions()
    stale = [f"{name} {before[name]} -> {after[name]}" for name in changed if name in before and name in imported]
    if stale:
        log.warning("RESTART NEEDED: %s changed after this session imported it. Runtime > Restart session, then run "
                    "the notebook again from the top (the install then finds everything in place).", "; ".join(stale))
    else:
        log.info("Installed or upgraded %d packages in %.0f s; nothing this session had imported changed.",
                 len(changed), time.perf_counter() - started)
