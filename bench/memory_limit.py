"""Run a command under a real resident-memory limit, like a free Colab's 12.7 GB, and say what it took.

The limit is a memory cgroup made for the command (as root): cgroup v1 (memory.limit_in_bytes, swap held to the
same limit where memory.memsw exists) or cgroup v2 (memory.max, memory.swap.max 0). Page cache counts against
it as it does on a 12.7 GB machine, and the kernel reclaims it before it kills anything; anonymous memory it
cannot reclaim without swap, so a command that needs more is killed by the OOM killer (or gets MemoryError),
as on Colab. The command joins the group before it starts (nothing runs outside it), its children too.

Prints one JSON line: limit, exit code, whether the OOM killer struck, seconds, peak anonymous memory of the
group (sampled from memory.stat every 0.2 s: a spike shorter than that can be missed), the group's peak usage
as the kernel counts it (exact; page cache included, so an upper bound), the command's own peak RSS (wait4,
which also counts the few MB of this launcher a forked child starts with), and how it was limited. Exits with the command's exit code.
Where no memory cgroup can be made it says so and exits 3 without running the command (never unlimited).

Usage: python bench/memory_limit.py 12.7GB -- python -m helpers.pipeline ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SAMPLE_SECONDS = 0.2
UNITS = {"GB": 10**9, "GIB": 2**30, "MB": 10**6, "MIB": 2**20, "KB": 10**3, "KIB": 2**10, "B": 1}


def parse_size(text: str) -> int:
    """'12.7GB' (10^9) or '512MiB' (2^20) in bytes."""
    upper = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * UNITS[unit])
    raise ValueError(f"memory limit {text!r} has no unit; write e.g. 12.7GB or 512MiB (units: {', '.join(UNITS)})")


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of the cgroup file systems."""
    rows = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, kind, options, *_ = line.split()
        if kind in ("cgroup", "cgroup2"):
            rows.append((point, kind, options.split(",")))
    return rows


def _own_path(controller: str | None) -> str:
    """This process's cgroup path for a v1 controller, or its v2 path (controller None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
            return path.lstrip("/")
    return ""


class Group:
    """A memory cgroup of its own for one command: made, limited, sampled, removed."""

    def __init__(self, limit: int):
        self.limit, self.version, self.path = limit, None, None
        name = f"lora-kit-limit-{os.getpid()}"
        mounts = _mounts()
        v1 = next((point for point, kind, options in mounts if kind == "cgroup" and "memory" in options), None)
        v2 = next((point for point, kind, _ in mounts if kind == "cgroup2"), None)
        errors = []
        if v1:
            try:
                self.path = Path(v1) / _own_path("memory") / name
                self.path.mkdir()
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                with contextlib.suppress(OSError):  # absent without swap accounting; then there is no swap to use
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
                self.version = 1
                return
            except OSError as error:
                errors.append(f"cgroup v1 at {self.path}: {error}")
                self._remove()
        if v2 and "memory" in (Path(v2) / "cgroup.controllers").read_text().split():
            for parent in (Path(v2) / _own_path(None), Path(v2)):
                try:
                    controls = (parent / "cgroup.subtree_control").read_text().split()
                    if "memory" not in controls:
                        (parent / "cgroup.subtree_control").write_text("+memory")
                    self.path = parent / name
                    self.path.mkdir()
                    (self.path / "memory.max").write_text(str(limit))
                    with contextlib.suppress(OSError):
                        (self.path / "memory.swap.max").write_text("0")
                    self.version = 2
                    return
                except OSError as error:
                    errors.append(f"cgroup v2 under {parent}: {error}")
                    self._remove()
        raise PermissionError("cannot limit memory here: " + ("; ".join(errors) or "no memory cgroup is mounted")
                              + ". Run as root on a machine with a memory cgroup (v1 or v2).")

    def join(self) -> None:
        """Put the calling process in the group (called in the child before it runs the command)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def anon_bytes(self) -> int:
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int(stat.get("total_rss" if self.version == 1 else "anon", 0))

    def peak_usage(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"  # v2: kernel 5.19 on
        with contextlib.suppress(OSError, ValueError):
            return int((self.path / name).read_text())
        return None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        with contextlib.suppress(OSError):
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def _remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def remove(self) -> None:
        for _ in range(50):  # the last task's exit is accounted a moment after wait returns
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_limited(limit: int, command: list[str]) -> dict:
    """Run command inside a memory cgroup limited to limit bytes; return what it took."""
    group = Group(limit)
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.wait(SAMPLE_SECONDS):
            with contextlib.suppress(OSError, ValueError):
                peak_anon = max(peak_anon, group.anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    try:
        process = subprocess.Popen(command, preexec_fn=group.join)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        code = os.waitstatus_to_exitcode(status)
        return {"limit_bytes": limit, "limit_gb": round(limit / 1e9, 3), "exit_code": code,
                "killed_by": signal.Signals(-code).name if code < 0 else None,
                "oom_kills": group.oom_kills(), "completed": code == 0, "seconds": round(seconds, 1),
                "peak_anon_gib": round(peak_anon / 2**30, 3),
                "peak_group_usage_gib": None if group.peak_usage() is None else round(group.peak_usage() / 2**30, 3),
                "peak_rss_gib_of_command": round(usage.ru_maxrss / 2**20, 3),
                "how": f"cgroup v{group.version} {group.path}", "command": command}
    finally:
        done.set()
        group.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description="Run a command under a memory limit (a memory cgroup).",
                                     usage="%(prog)s LIMIT -- COMMAND ...")
    parser.add_argument("limit", help="e.g. 12.7GB (a free Colab's RAM) or 512MiB")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    try:
        result = run_limited(parse_size(args.limit), command)
    except PermissionError as error:
        print(json.dumps({"limited": False, "error": str(error)}), flush=True)
        return 3
    print(json.dumps(result), flush=True)
    return result["exit_code"] if result["exit_code"] >= 0 else 128 - result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
