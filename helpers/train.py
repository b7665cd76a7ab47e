"""The training entry point, used by the training notebooks and the command line, single- or multi-process.

    python -m helpers.train --profile cpu_tiny -p max_steps 30               # one process (CPU or one GPU)
    accelerate launch --num_processes 2 -m helpers.train --profile colab_t4  # data-parallel on 2 GPUs

From a notebook, train(config) runs in the kernel, or on config.num_processes GPUs through `accelerate launch`;
train(config, dpo=True) runs preference tuning (DPO), always in the kernel. The run itself is
helpers.fine_tuning's: guard the run, then rows, model, trainer, record.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from helpers import plotting
from helpers.config import RunConfig
from helpers.project import add_profile_arguments, profile_parameters, refused_as_usage_error
from helpers.records import read_json
from helpers.timing import stages_line


def train(config: RunConfig, rows: list[dict[str, Any]] | None = None, dpo: bool = False) -> dict[str, Any]:
    """Train from a notebook: in this kernel, or on config.num_processes GPUs through `accelerate launch` in
    fresh processes (accelerate's notebook_launcher needs a kernel where CUDA was never touched, and importing
    unsloth touches it), their output shown here. DPO (dpo=True) trains in this kernel. Returns the run's
    metrics."""
    if config.num_processes == 1 or dpo:
        from helpers.environment import release_memory
        from helpers.fine_tuning import run_training

        metrics = run_training(config, rows, dpo=dpo)
        release_memory()  # the trained model is gone with run_training's frame: give its GPU memory back
        return metrics
    with tempfile.TemporaryDirectory() as folder:
        parameters = Path(folder) / "parameters.json"
        parameters.write_text(json.dumps(config.to_dict()))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.num_processes),
                   "-m", "helpers.train", "--parameters", str(parameters)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as launched:
            for line in launched.stdout:
                print(line, end="")
    if launched.returncode:
        raise RuntimeError(f"training on {config.num_processes} processes failed (exit status {launched.returncode}); "
                           "its output is above")
    return read_json(Path(config.run_dir) / "run.json")["metrics"]


def summary(run_dir: str | Path) -> str:
    """Two human lines about a finished run: steps, time, tokens, loss and memory; then where the time went."""
    record = read_json(Path(run_dir) / "run.json")
    return f"{summary_line(record['metrics'])}\n{stages_line(record.get('stages', {}))}"


def summary_line(metrics: dict[str, Any]) -> str:
    """One human line about a finished run's training."""
    gpu = metrics.get("peak_gpu_reserved_gib")
    memory = (f"peak GPU memory {gpu} of {metrics['gpu_total_gib']} GiB reserved" if gpu is not None
              else f"peak RSS {metrics['peak_rss_gib']} GiB")
    return (f"{metrics['steps']} steps in {metrics['train_runtime_s']} s, {metrics['trained_tokens']} tokens "
            f"({metrics['tokens_per_s']} tokens/s), loss {metrics['first_loss']} -> {metrics['final_loss']}, {memory}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_arguments(parser)
    parser.add_argument("--parameters", type=Path, help="a JSON file of every parameter (instead of a profile)")
    args = parser.parse_args(argv)
    with refused_as_usage_error(parser):
        params = json.loads(args.parameters.read_text()) if args.parameters else profile_parameters(args)
        config = RunConfig.from_dict(params)
    from helpers.fine_tuning import run_training  # once the parameters are good: it loads unsloth and torch

    if run_training(config) is not None:
        plotting.plot_loss(config.run_dir)
        print(summary(config.run_dir))


if __name__ == "__main__":
    main()
