"""JupyterLab in headless Chromium: the training notebook run from the UI on the tiny profile, its loss curve
redrawn in place in the training cell's output while it trains."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.paths import NOTEBOOKS, PROJECT_ROOT
from helpers.project import load_profile
from helpers.records import read_json

pytestmark = pytest.mark.browser
STEPS = 20  # the live plot redraws every 5 logged steps: 4 redraws, the held-out loss in the last two
SCREENSHOTS = PROJECT_ROOT / "outputs" / "jupyterlab"
SUMMARY = re.compile(rf"{STEPS} steps in [\d.]+ s, \d+ tokens \([\d.]+ tokens/s\), loss [\d.]+ -> [\d.]+, peak RSS")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium: on PATH, or installed with apt-get where this process may (as root, as CI runs); else the
    test skips, saying why. Playwright drives it; Playwright's own browser download is not used."""
    if path := shutil.which("chromium"):
        return path
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it with")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode:
            pytest.skip(f"chromium could not be installed: {' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """(base URL, token, root folder) of a JupyterLab server on a free local port, serving an empty folder."""
    root, port, token = tmp_path / "lab", free_port(), secrets.token_hex(16)
    root.mkdir()
    # Jupyter's configuration, settings and workspaces of its own, so that none of the user's apply
    jupyter = {name: tmp_path / "jupyter" / name for name in ("config", "data", "runtime", "settings", "workspaces")}
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(jupyter["config"]), "JUPYTER_DATA_DIR": str(jupyter["data"]),
           "JUPYTER_RUNTIME_DIR": str(jupyter["runtime"]), "JUPYTERLAB_SETTINGS_DIR": str(jupyter["settings"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(jupyter["workspaces"]),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))))}
    notifications = jupyter["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notifications.parent.mkdir(parents=True)
    notifications.write_text('{"fetchNews": "false", "checkForUpdates": false}')  # no news toast over the screenshot
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer within 90 s"
                time.sleep(0.5)
        yield url, token, root
    finally:
        try:  # shuts its kernels down too
            shutdown = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(shutdown, timeout=10)
            server.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            server.kill()
            server.wait()
        log.close()


def tiny_training_notebook(root: Path, tmp_path: Path) -> Path:
    """notebooks/01_train_lora.ipynb with the tiny profile injected, not run: `papermill --prepare-only -f`."""
    import papermill

    from helpers.local_models import build_tiny_model

    params = {**load_profile("cpu_tiny"), "model_name": str(build_tiny_model(tmp_path / "model")),
              "run_dir": str(tmp_path / "run"), "max_steps": STEPS, "eval_steps": STEPS // 2}
    notebook = root / "01_train_lora.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / notebook.name), str(notebook), parameters=params, prepare_only=True)
    return notebook


def test_live_loss_plot_redraws_in_place_in_jupyterlab(chromium, lab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    notebook = tiny_training_notebook(root, tmp_path)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(f"{url}/lab/tree/{notebook.name}?token={token}")
        kernel_idle = page.get_by_text("Python 3 (ipykernel) | Idle")
        kernel_idle.wait_for(timeout=90_000)  # the kernel has started
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")

        cell = page.locator(".jp-CodeCell").filter(has_text="helpers.train.train(config, rows)")
        images, output = cell.locator(".jp-OutputArea-output img"), cell.locator(".jp-OutputArea")
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")

        def screenshot(name: str) -> None:
            cell.evaluate("element => element.scrollIntoView({block: 'start'})")
            page.screenshot(path=SCREENSHOTS / name)

        seen, most, deadline = [], 0, time.monotonic() + 480  # distinct images, most images at once
        while not SUMMARY.search(output.inner_text()):  # until the cell prints its summary line
            assert not errors.count(), f"a cell failed: {errors.first.inner_text()[-2000:]}"
            assert time.monotonic() < deadline, f"training did not end within 480 s: {output.inner_text()[-2000:]}"
            most = max(most, count := images.count())
            if count == 1 and (src := images.first.get_attribute("src")) not in seen:
                seen.append(src)
                if len(seen) == 2:
                    screenshot("training.png")
            time.sleep(0.2)
        loss_curve = page.locator(".jp-CodeCell").filter(has_text="helpers.plotting.plot_loss(config.run_dir)")
        loss_curve.locator(".jp-OutputArea-output img").wait_for(timeout=60_000)  # the last cell has run
        screenshot("finished.png")
        count, final = images.count(), images.first.get_attribute("src")
        browser.close()

    assert most <= 1 and count == 1, f"the training cell's output held {max(most, count)} images, not one redrawn"
    assert len(seen) >= 2, f"the loss plot did not change while training ran ({len(seen)} distinct image seen)"
    assert final != seen[0] and final.startswith("data:image/png;base64,")
    record = read_json(tmp_path / "run" / "run.json")
    assert record["status"] == "finished" and record["metrics"]["steps"] == STEPS
    for name in ("training.png", "finished.png"):
        assert (SCREENSHOTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
