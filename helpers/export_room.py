"""Room for an export: where each format is written, whether its disk has room, and the memory writing it took.

Memory is watched, not predicted: a merge is attempted while a thread samples the process's resident memory
(anonymous pages apart: file pages of memory-mapped weights count in RSS but the kernel can drop them under
pressure), and the peaks go into the manifest, written as they grow so that a runtime killed for memory still
leaves the figure behind. On Colab, with run_dir on Google Drive (15 GB free), the large formats are written to
the runtime's own disk and copied to Drive only where they fit.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The formats that can outgrow a free Drive: 16 GB merged 16-bit for an 8B model, 8.5 GB a q8_0 GGUF.
LARGE_FORMATS = ("merged_16bit", "gguf")
DRIVE_ROOT = Path("/content/drive")
COLAB_LOCAL_EXPORTS = Path("/content/exports")  # the runtime's own disk (~100 GB on a free Colab), lost with it
DRIVE_MARGIN_BYTES = 2**30  # left free on Drive after a copy: a full Drive stops checkpoints and other saves
# Measured: the 8B stand-in's merged_16bit wrote 14.96 GiB for 8.03e9 parameters (H200, 2026-11-30,
# bench/gpu_colab_t4.sh): 2.0 bytes a parameter, the size of its bf16 weights; nothing else of size is written.
MEASURED_16BIT = "2.0 bytes a parameter, measured: 14.96 GiB written for the 8B stand-in's merged_16bit (2026-11-30)"
SAMPLE_SECONDS = 0.25
GIB = 2**30


def on_drive(path: str | Path) -> bool:
    """Whether path lies on the mounted Google Drive."""
    return Path(path).is_absolute() and Path(path).is_relative_to(DRIVE_ROOT)


def export_folder(export_format: str, run_dir: str | Path, colab: bool,
                  local_root: Path = COLAB_LOCAL_EXPORTS) -> Path:
    """Where a format is written: run_dir/export/<format>, except on Colab with run_dir on Drive, where a large
    format goes to the runtime's own disk (local_root/<run name>/<format>) and is copied to Drive if it fits."""
    if colab and export_format in LARGE_FORMATS and on_drive(run_dir):
        return local_root / Path(run_dir).name / export_format
    return Path(run_dir) / "export" / export_format


def drive_copy_verdict(total_bytes: int, drive_free_bytes: int) -> str | None:
    """None when an export of total_bytes fits the Drive's free space (a margin kept), else why not."""
    if total_bytes + DRIVE_MARGIN_BYTES <= drive_free_bytes:
        return None
    return (f"{total_bytes / 1e9:.1f} GB do not fit the {drive_free_bytes / 1e9:.1f} GB free on Drive "
            f"(keeping {DRIVE_MARGIN_BYTES / 2**30:.0f} GiB free)")


def how_to_keep(folder: Path, files: list[str]) -> str:
    """What a user does to keep a format that lives only on the Colab runtime's disk."""
    biggest = max(files, key=lambda name: (folder / name).stat().st_size) if files else ""
    return (f"only on this runtime's disk ({folder}), lost when the runtime ends: push it to the Hub "
            f"(push_to_hub=True, hub_repo_id=...), or download it: from google.colab import files; "
            f"files.download('{folder / biggest}') (large files are slow through the browser)")


def check_disk(need_bytes: int, folder: Path, basis: str) -> None:
    """Refuse before writing when need_bytes do not fit the disk folder will be on, naming the figure need rests on."""
    where = next(p for p in (folder, *folder.parents) if p.exists())  # folder itself may not exist yet
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise RuntimeError(f"this export needs about {need_bytes / 1e9:.1f} GB in {where} ({basis}), where "
                           f"{free / 1e9:.1f} GB are free; free space there, or leave merged_16bit and gguf out of "
                           "formats (the lora adapter and gguf_lora are far smaller)")


def _status_fields() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes (Linux; empty elsewhere)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def _cgroup_memory_dir() -> tuple[int, Path] | None:
    """(version, folder) of this process's memory cgroup where one is mounted (v1 memory controller, or v2)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                if (folder / "memory.limit_in_bytes").is_file():
                    return 1, folder
            elif controllers == "" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").is_file():
                return 2, Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup in bytes (v1 memory.limit_in_bytes, v2 memory.max), or None."""
    found = _cgroup_memory_dir()
    if found is None:
        return None
    version, folder = found
    with contextlib.suppress(OSError, ValueError):  # v2 writes "max" for no limit
        value = int((folder / ("memory.limit_in_bytes" if version == 1 else "memory.max")).read_text())
        return value if value < 2**60 else None  # v1 writes a huge number for no limit
    return None


def available_memory() -> int | None:
    """Bytes this process could still take: the machine's MemAvailable, or less under a cgroup limit (the limit
    less the group's anonymous memory; its page cache can be reclaimed)."""
    available = None
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    limit, found = cgroup_memory_limit(), _cgroup_memory_dir()
    if limit is not None and found is not None:
        with contextlib.suppress(OSError, ValueError):
            stat = dict(line.split() for line in (found[1] / "memory.stat").read_text().splitlines())
            anon = int(stat.get("total_rss" if found[0] == 1 else "anon", 0))
            available = min(available if available is not None else limit, limit - anon)
    return available


class MemoryWatch:
    """Samples this process's memory while a block runs: peak RSS, peak anonymous RSS, the kernel's own peak
    (VmHWM, reset at the start where the kernel allows), the least memory the machine had available, and the
    cgroup limit if any. `report` is called with the peaks so far every report_seconds (to save them)."""

    def __init__(self, report: Callable[[dict[str, Any]], None] | None = None, report_seconds: float = 5.0):
        self.report, self.report_seconds = report, report_seconds
        self.peak_rss = self.peak_anon = 0
        self.least_available: int | None = None
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="memory-watch", daemon=True)

    def __enter__(self) -> MemoryWatch:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, so the peak is this block's
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        fields = _status_fields()
        self.peak_rss = max(self.peak_rss, fields.get("VmRSS", 0), fields.get("VmHWM", 0))
        self.peak_anon = max(self.peak_anon, fields.get("RssAnon", 0))
        available = available_memory()
        if available is not None:
            self.least_available = min(available, self.least_available or available)

    def _sample_until_stopped(self) -> None:
        last_report = time.perf_counter()
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()
            if self.report and time.perf_counter() - last_report >= self.report_seconds:
                last_report = time.perf_counter()
                with contextlib.suppress(Exception):  # a failed save of the figures must not stop the export
                    self.report(self.peaks())

    def peaks(self) -> dict[str, Any]:
        """The peaks so far in GiB, how they were taken, and the seconds watched."""
        limit = cgroup_memory_limit()
        return {"peak_rss_gib": round(self.peak_rss / GIB, 3), "peak_anon_gib": round(self.peak_anon / GIB, 3),
                "least_available_gib": None if self.least_available is None else round(self.least_available / GIB, 3),
                "cgroup_limit_gib": None if limit is None else round(limit / GIB, 3),
                "host_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 2),
                "seconds_watched": round(time.perf_counter() - self.started, 1),
                "how": f"this process's /proc/self/status sampled every {SAMPLE_SECONDS} s (VmRSS and VmHWM for "
                       "RSS, RssAnon for anonymous memory); child processes (converter, quantizer, llama.cpp) "
                       "are measured apart"}

