"""Run the notebooks in order through papermill (setup -> train -> inference) and keep the executed copies."""
from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from helpers.config import RunConfig
from helpers.data import is_local_path
from helpers.paths import NOTEBOOKS, PROJECT_ROOT
from helpers.project import (
    add_profile_arguments,
    default_profile,
    load_profile,
    overrides_from,
    refused_as_usage_error,
)

PIPELINE = ("00_setup", "01_train_lora", "02_inference", "03_evaluate")


def notebook_parameter_names(notebook: Path) -> set[str]:
    """The names assigned in a notebook's cell tagged `parameters`."""
    import ast

    import nbformat

    cells = [c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook} has {len(cells)} cells tagged 'parameters'; it needs exactly one")
    tree = ast.parse(cells[0].source)
    return {node.target.id if isinstance(node, ast.AnnAssign) else node.targets[0].id
            for node in tree.body if isinstance(node, (ast.AnnAssign, ast.Assign))}


def run_notebook(name: str, params: dict[str, Any], out_dir: Path, progress_bar: bool = True) -> Path:
    """Execute notebooks/<name>.ipynb with the parameters it declares; save the executed copy in out_dir."""
    import papermill

    notebook = NOTEBOOKS / f"{name}.ipynb"
    wanted = notebook_parameter_names(notebook)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(str(notebook), str(output), parameters={k: v for k, v in params.items() if k in wanted},
                               cwd=str(PROJECT_ROOT), kernel_name="python3", progress_bar=progress_bar,
                               config=_kernel_sockets())
    return output


def _kernel_sockets():
    """Where papermill and the kernel talk: on Linux and macOS Unix sockets of this kernel's own, not TCP ports on
    localhost, which kernels started at the same moment (a batch's points in parallel) can both pick, one of them
    then never starting."""
    from traitlets.config import Config

    if os.name != "posix":
        return Config()
    path = Path(tempfile.gettempdir()) / f"kernel-{secrets.token_hex(6)}"
    return Config({"KernelManager": {"transport": "ipc", "ip": str(path)}})


def use_offline_hub_when_local(configs: list[RunConfig]) -> None:
    """Set HF_HUB_OFFLINE when every config's model and data are local: never wait on the network."""
    if all(is_local_path(c.model_name, PROJECT_ROOT) and is_local_path(c.dataset, PROJECT_ROOT) for c in configs):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_pipeline(profile: str, overrides: dict[str, Any] | None = None,
                 notebooks: tuple[str, ...] = PIPELINE) -> Path:
    """Run the notebooks on a profile (plus overrides); return the run_dir holding every output."""
    params = {**load_profile(profile), **(overrides or {})}
    config = RunConfig.from_dict(params)
    run_dir = PROJECT_ROOT / config.run_dir
    use_offline_hub_when_local([config])
    for name in notebooks:
        started = time.perf_counter()
        run_notebook(name, params, run_dir)
        print(f"{name}: {time.perf_counter() - started:.0f} s")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.pipeline", description=__doc__)
    add_profile_arguments(parser)
    parser.add_argument("--notebooks", nargs="+", default=list(PIPELINE), metavar="NAME",
                        choices=sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")),
                        help=f"which notebooks to run, in order (default: {' '.join(PIPELINE)})")
    args = parser.parse_args(argv)
    with refused_as_usage_error(parser):
        profile, overrides = args.profile or default_profile(), overrides_from(args)
        RunConfig.from_dict({**load_profile(profile), **overrides})
    started = time.perf_counter()
    run_dir = run_pipeline(profile, overrides, tuple(args.notebooks))
    rel = run_dir.relative_to(PROJECT_ROOT) if run_dir.is_relative_to(PROJECT_ROOT) else run_dir
    print(f"\nPipeline finished in {time.perf_counter() - started:.0f} s. Outputs in {rel}/:")
    for path in sorted(run_dir.iterdir()):
        print(f"  {path.name}{'/' if path.is_dir() else ''}")
    print(f"Loss plot: {rel}/loss.png")


if __name__ == "__main__":
    main()
