"""The training entry point, used by the training notebook and the command line, single- or multi-process.

    python -m helpers.train --profile cpu_tiny -p max_steps 30               # one process (CPU or one GPU)
    accelerate launch --num_processes 2 -m helpers.train --profile colab_t4  # data-parallel on 2 GPUs

From a notebook, train(config) runs in the kernel, or on config.num_processes GPUs through `accelerate launch`.

The global batch is what the config asks for on one process (per_device_train_batch_size x
gradient_accumulation_steps); with N processes the accumulation is divided by N so that it stays the same.
Each process then computes its rows per step as micro_batching asks (helpers.batching): in the recipe's
micro-batches, or in fewer, larger ones where memory allows. run.json's `distributed` records what ran.
Only the main process writes run.json, split.json, the log, the plot and the adapter.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import helpers.stack  # noqa: F401  (unsloth before transformers, trl, peft)
from helpers import batching, data, modeling, plotting, training
from helpers.config import RunConfig
from helpers.environment import peak_memory, release_memory
from helpers.records import read_json, update_run_record


def split_global_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """(per-device batch, accumulation) on `processes` processes keeping the one-process global batch."""
    global_batch = per_device * accumulation
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if global_batch % (per_device * processes):
        raise ValueError(f"the global batch {global_batch} (per_device_train_batch_size {per_device} x "
                         f"gradient_accumulation_steps {accumulation}) does not split evenly over {processes} "
                         f"processes; choose an accumulation divisible by {processes}")
    return per_device, global_batch // (per_device * processes)


def run_training(config: RunConfig, rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Check, hold out, format, load, train and record, in this process (one of N under accelerate); `rows`
    are the checked dataset rows when the caller has them already. Returns the metrics on the main process,
    None on the others."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    per_device, accumulation = split_global_batch(config.per_device_train_batch_size,
                                                  config.gradient_accumulation_steps, state.num_processes)
    rows = data.load_checked_rows(config) if rows is None else rows
    with state.main_process_first():  # the main process checks run_dir and writes run.json and split.json first
        precision = training.prepare_run(config, main_process=state.is_main_process)
        train_rows, eval_rows = data.hold_out(rows, config, write=state.is_main_process)
    tokenizer = modeling.load_tokenizer(config)
    train_set = data.to_training_set(train_rows, config, tokenizer)
    eval_set = data.to_training_set(eval_rows, config, tokenizer) if eval_rows else None
    model, tokenizer = modeling.load_base_model(config, precision)
    model = modeling.add_lora(model, config)
    per_device, accumulation = batching.micro_batches(config, per_device, accumulation, model)
    run_config = dataclasses.replace(config, per_device_train_batch_size=per_device,
                                     gradient_accumulation_steps=accumulation)
    trainer = training.build_trainer(model, tokenizer, train_set, run_config, precision, eval_set)
    metrics = training.train_and_record(trainer, model, tokenizer, config)
    peaks = gather_object([peak_memory()])  # every process's own peaks (each its own GPU), collected on all
    if metrics is None:
        return None
    update_run_record(config.run_dir, distributed={"num_processes": state.num_processes,
                                                   "micro_batching": config.micro_batching,
                                                   "per_device_train_batch_size": per_device,
                                                   "gradient_accumulation_steps": accumulation,
                                                   "global_batch": per_device * accumulation * state.num_processes,
                                                   "peak_memory_per_process": peaks})
    return metrics


def train(config: RunConfig, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train from a notebook: in this kernel, or on config.num_processes GPUs through `accelerate launch` in
    fresh processes (accelerate's notebook_launcher needs a kernel where CUDA was never touched, and importing
    unsloth touches it), their output shown here. Returns the run's metrics."""
    if config.num_processes == 1:
        metrics = run_training(config, rows)
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


def main(argv: list[str] | None = None) -> None:
    from helpers.project import add_profile_arguments, profile_parameters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_arguments(parser)
    parser.add_argument("--parameters", type=Path, help="a JSON file of every parameter (instead of a profile)")
    args = parser.parse_args(argv)
    params = json.loads(args.parameters.read_text()) if args.parameters else profile_parameters(args)
    config = RunConfig.from_dict(params)
    metrics = run_training(config)
    if metrics is not None:
        plotting.plot_loss(config.run_dir)
        print(training.summary_line(metrics))


if __name__ == "__main__":
    main()
