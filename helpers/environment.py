"""What machine this is: GPU, precision, package versions, Colab or not."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from helpers.paths import PROJECT_ROOT

PACKAGES = ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "datasets", "accelerate",
            "bitsandbytes", "papermill")


def in_colab() -> bool:
    """True inside Google Colab (the check unsloth's notebooks use)."""
    return "COLAB_" in "".join(os.environ)


def is_interactive() -> bool:
    """True in a notebook a person is watching (Colab, Jupyter, VS Code), False headless (papermill, scripts)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell" and not in_colab():
        return False
    # Kernels started by a notebook front end carry these; papermill's do not.
    return in_colab() or any(k in os.environ for k in ("JPY_SESSION_NAME", "VSCODE_PID"))


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None when missing)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The project's git commit, with '-dirty' when the work tree has changes; None outside a checkout."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_report() -> dict:
    """The accelerator this process would train on: name, memory, bf16 support, compute capability."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "name": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": "cuda",
        "name": props.name,
        "total_memory_gib": round(gpu_total_gib(), 2),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16_supported": bf16_supported(),
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }


def environment_report() -> dict:
    """Everything worth knowing about this machine before training: device, versions, Colab, token present."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "colab": in_colab(),
        "hf_token_present": hub_token_present(),
        **{"accelerator": device_report()},
        "versions": package_versions(),
        "git_commit": git_commit(),
    }


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (HF_HUB_OFFLINE): only its local cache is read."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_token_present() -> bool:
    """Whether a Hugging Face token is available (Colab secret, HF_TOKEN, or token file); never the token."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return bool(os.environ.get("HF_TOKEN"))
    return get_token() is not None


def bf16_supported() -> bool:
    """Whether the first GPU computes in bf16 natively. torch's own check also counts emulated bf16, which a T4
    (compute capability 7.5) has: training there in bf16 would be slow or fail, so it counts as no."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str) -> str:
    """The precision to train in: 'auto' becomes bf16 where the hardware has it, else fp16 (GPU) or fp32 (CPU)."""
    import torch

    if torch.cuda.is_available():
        bf16 = bf16_supported()
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            name = torch.cuda.get_device_name(0)
            raise ValueError(f"precision 'bf16' is not supported by {name}; choose one of: auto, fp16, fp32")
        return precision
    if precision == "auto":
        from unsloth_zoo.cpu import cpu_bf16_supported

        return "bf16" if cpu_bf16_supported() else "fp32"
    return precision


def torch_dtype(precision: str):
    """The torch dtype for a resolved precision name."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


RUN_DIR = "outputs/lora-run"
DRIVE_RUN_DIR = "/content/drive/MyDrive/lora-kit/lora-run"  # on Colab: survives the runtime, 15 GB free


def default_run_dir() -> str:
    """Where a run goes when none is named: on Colab in Google Drive (a runtime's disk is lost with it), else
    outputs/lora-run."""
    return DRIVE_RUN_DIR if in_colab() else RUN_DIR


def mount_drive_if_needed(run_dir: str) -> None:
    """On Colab, mount Google Drive when run_dir lies on it, so a disconnect loses at most save_steps steps."""
    if in_colab() and str(run_dir).startswith("/content/drive/") and not Path("/content/drive/MyDrive").exists():
        from google.colab import drive

        drive.mount("/content/drive")


def use_project_root() -> Path:
    """Work from the project root, so relative paths in parameters mean the same from any notebook folder."""
    if (PROJECT_ROOT / "notebooks").is_dir() and Path.cwd() != PROJECT_ROOT:
        os.chdir(PROJECT_ROOT)
    return Path.cwd()


def environment_markdown(report: dict) -> str:
    """The environment report as a two-column Markdown table."""
    rows = []
    for key, value in report.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            rows.append((key, value))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def gpu_total_gib() -> float:
    """Total memory of the first CUDA device in GiB."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def cap_gpu_memory(gib: float) -> None:
    """Limit this process's share of GPU memory to gib (0: no cap), e.g. 15 to stand in for a Colab T4."""
    import torch

    if gib and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib / gpu_total_gib()))


def release_memory() -> None:
    """Collect unreachable objects and return cached GPU memory to the driver (after a model is dropped)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    """Start peak-memory accounting afresh (GPU only; CPU peaks are per process)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak GPU memory (allocated, reserved) in GiB on CUDA; peak resident memory of the process in GiB."""
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peaks = {"peak_rss_gib": round(rss_kib / 2**20, 3)}
    if torch.cuda.is_available():
        peaks["gpu_total_gib"] = round(gpu_total_gib(), 2)
        peaks["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        peaks["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return peaks
