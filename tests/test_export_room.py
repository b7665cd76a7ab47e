"""Room for an export: where each format goes on Colab and elsewhere, what is copied to Drive, the memory watched
while a format is written, and a command run under a real memory limit (bench/memory_limit.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.export_room import (DRIVE_MARGIN_BYTES, MemoryWatch, drive_copy_verdict, export_folder, how_to_keep,
                                 on_drive)
from helpers.paths import PROJECT_ROOT

DRIVE_RUN = "/content/drive/MyDrive/lora-kit/lora-run"


@pytest.mark.parametrize("export_format, colab, run_dir, expected", [
    ("merged_16bit", True, DRIVE_RUN, "/local/lora-run/merged_16bit"),  # 16 GB: the runtime's disk
    ("gguf", True, DRIVE_RUN, "/local/lora-run/gguf"),
    ("lora", True, DRIVE_RUN, f"{DRIVE_RUN}/export/lora"),  # hundreds of MB: straight to Drive
    ("gguf_lora", True, DRIVE_RUN, f"{DRIVE_RUN}/export/gguf_lora"),
    ("merged_16bit", True, "/content/runs/a", "/content/runs/a/export/merged_16bit"),  # run_dir already local
    ("merged_16bit", False, DRIVE_RUN, f"{DRIVE_RUN}/export/merged_16bit"),  # not Colab: where run_dir is
    ("gguf", False, "outputs/run", "outputs/run/export/gguf"),
])
def test_large_formats_go_to_the_colab_runtime_disk_only_when_run_dir_is_on_drive(export_format, colab, run_dir,
                                                                                  expected):
    assert export_folder(export_format, run_dir, colab, local_root=Path("/local")) == Path(expected)


def test_what_fits_the_drive_is_copied_and_what_does_not_is_said_with_the_figures():
    assert on_drive(DRIVE_RUN) and not on_drive("/content/exports") and not on_drive("outputs/run")
    gib = 2**30
    assert drive_copy_verdict(5 * gib, 5 * gib + DRIVE_MARGIN_BYTES) is None
    verdict = drive_copy_verdict(16 * 10**9, 15 * 10**9)  # merged 16-bit 8B on a free Drive
    assert verdict == "16.0 GB do not fit the 15.0 GB free on Drive (keeping 1 GiB free)"
    assert drive_copy_verdict(14 * 10**9, 15 * 10**9) is not None  # it would fill the Drive to the last GiB


def test_a_format_left_on_the_runtime_disk_says_how_to_keep_it(tmp_path):
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "run.Q8_0.gguf").write_bytes(b"x" * 1000)
    text = how_to_keep(tmp_path, ["README.md", "run.Q8_0.gguf"])
    assert "lost when the runtime ends" in text and "push_to_hub=True" in text
    assert f"files.download('{tmp_path / 'run.Q8_0.gguf'}')" in text  # the biggest file: the model


def test_the_memory_watch_sees_a_block_allocate_and_reports_while_it_runs():
    reports = []
    with MemoryWatch(reports.append, report_seconds=0.3) as watch:
        before = watch.peaks()["peak_anon_gib"]
        block = b"x" * (300 * 2**20)  # 300 MiB of anonymous memory, touched
        import time

        time.sleep(1.0)
    peaks = watch.peaks()
    del block
    assert peaks["peak_anon_gib"] >= before + 0.25, peaks
    assert peaks["peak_rss_gib"] >= peaks["peak_anon_gib"] - 0.01
    assert reports and reports[-1]["peak_anon_gib"] >= before + 0.25  # saved while it ran, not only after
    assert peaks["host_total_gib"] > 0 and "RssAnon" in peaks["how"]


def _limited(limit: str, megabytes: int) -> tuple[int, dict]:
    code = f"import time; b = b'x' * ({megabytes} * 2**20); time.sleep(0.6); print(len(b))"  # held: it is sampled
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench/memory_limit.py"), limit, "--",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_a_command_over_the_memory_limit_is_killed_and_one_under_it_completes():
    code, result = _limited("250MiB", 100)
    if result.get("limited") is False:
        pytest.skip(result["error"])  # no writable memory cgroup here (not root, or none mounted)
    assert code == 0 and result["completed"] and result["oom_kills"] == 0
    assert 0.09 < result["peak_anon_gib"] < 0.25, result
    code, result = _limited("250MiB", 400)
    assert code != 0 and not result["completed"], result
    assert result["oom_kills"] >= 1  # the kernel's OOM killer, as on a Colab that runs out
    assert result["peak_group_usage_gib"] <= 250 / 1024 + 0.01  # never above the limit


def test_a_format_on_the_runtime_disk_is_copied_to_drive_only_when_it_fits(tmp_path, monkeypatch):
    import types

    import helpers.export as export
    from helpers.config import RunConfig

    local = tmp_path / "local/run/gguf"
    local.mkdir(parents=True)
    (local / "run.Q8_0.gguf").write_bytes(b"x" * 100)
    run = tmp_path / "drive/run"
    (run / "export").mkdir(parents=True)
    config = RunConfig(run_dir=str(run))
    entry = {"format": "gguf", "files": [{"name": "run.Q8_0.gguf", "bytes": 100}], "total_bytes": 100}
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10 * 2**30))
    assert export._copy_to_drive(entry, local, config) == {"written_to": str(local), "copied_to": "export/gguf"}
    assert (run / "export/gguf/run.Q8_0.gguf").read_bytes() == b"x" * 100
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=2**20))
    where = export._copy_to_drive({**entry, "format": "merged_16bit"}, local, config)
    assert "do not fit" in where["not_copied"] and "files.download" in where["to_keep_it"]
    assert not (run / "export/merged_16bit").exists()
