"""A batch's points several at once as Ray tasks: on the GPUs (or cores) of this machine, or on a Ray cluster.

Each point is one task asking for its GPUs (the point's num_processes; on a cluster without GPUs, a share of the
cores) that runs the point's notebooks through papermill in a kernel of its own, as a one-at-a-time batch does. The
nodes must see the project folder and the batch folder at the same paths (a shared filesystem): every task checks
that before it starts. A task whose worker dies (killed, out of memory, its node lost) is reported as crashed with
Ray's reason; the others go on. Ray is imported only here, and only for a batch that runs points in parallel.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from helpers.batch_plan import Point
from helpers.records import atomic_write_text

log = logging.getLogger(__name__)

# What a point's kernel needs from the batch's environment on any node. Never a token: a node's workers read
# HF_TOKEN from that node's own environment.
FORWARDED_ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS")
SHARED_MARK = ".ray-batch"  # written by the driver into the batch folder; a node that cannot read it does not share it


class Progress(Protocol):
    """What the batch shows while points run."""

    def started(self, point: Point) -> None: ...

    def ended(self, point: Point, status: str) -> None: ...


def ray_connected() -> bool:
    """True when this process has already started or joined Ray (ray.init, e.g. in a notebook or a test)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def use_ray(workers: int | str, address: str | None) -> bool:
    """Points through Ray: more than one worker, a cluster's address, a Ray joined already, or 'auto' with several
    GPUs here."""
    if workers == "auto" and not address and not ray_connected():
        import torch

        return torch.cuda.device_count() > 1
    return workers != 1 or bool(address)


def import_ray() -> Any:
    """The ray module, or an error saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("running a batch's points in parallel needs Ray, which is not installed here: "
                                  "pip install the ray line of requirements-dev.txt, or run with workers: 1") from None
    return ray


def run_points(points: Sequence[Point], run: Callable[..., str], args: tuple, workers: int | str,
               address: str | None, folder: Path, progress: Progress,
               crashed: Callable[[Point, str], str]) -> None:
    """Run run(point, *args) for every point as a Ray task, `workers` at a time ('auto': one per GPU of the cluster),
    on the Ray this process joined already, else on the cluster at address, else on a local Ray started here."""
    ray = import_ray()
    joined = ray_connected()
    if not joined:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    in_flight: dict[Any, Point] = {}
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        workers = max(1, gpus) if workers == "auto" else workers
        if workers > (gpus or cpus):  # more would only wait for a GPU (a core) while the bar called them running
            log.warning("workers %d, but Ray has %d %s: %d point(s) at once", workers, gpus or cpus,
                        "GPU(s)" if gpus else "CPU(s)", gpus or cpus)
            workers = gpus or cpus
        threads = max(1, cpus // (gpus or workers))  # each point's share of the cores: its torch threads
        log.info("Ray: %d GPU(s), %d CPU(s); %d point(s) at once, each on %s with %d thread(s)", gpus, cpus, workers,
                 "its own GPU" if gpus else f"{threads} core(s)", threads)
        token = secrets.token_hex(8)
        atomic_write_text(folder / SHARED_MARK, token)
        environment = {**{k: os.environ[k] for k in FORWARDED_ENVIRONMENT if k in os.environ},
                       "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        task = ray.remote(max_retries=0)(_run_in_worker)  # a crashed point is recorded, not retried behind our back
        waiting = list(points)
        while waiting or in_flight:
            while waiting and len(in_flight) < workers:
                point = waiting.pop(0)
                needs = ({"num_gpus": point.config.num_processes, "num_cpus": 1} if gpus else {"num_cpus": threads})
                in_flight[task.options(**needs).remote(run, point, args, environment, folder, token)] = point
                progress.started(point)
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                point = in_flight.pop(ref)
                try:
                    status = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # raised in the task, outside the notebooks it runs
                    status = crashed(point, _first_line(getattr(error, "cause", None) or error))
                except ray.exceptions.RayError as error:  # the worker died: killed, out of memory, node lost
                    status = crashed(point, f"its Ray worker died ({type(error).__name__}: {_first_line(error)}); "
                                            "a rerun resumes its training from the newest checkpoint")
                progress.ended(point, status)
    finally:
        for ref in in_flight:  # interrupted: stop the points under way (their kernels end with their workers)
            ray.cancel(ref, force=True)
        if not joined:
            ray.shutdown()


def _run_in_worker(run: Callable[..., str], point: Point, args: tuple, environment: dict[str, str], folder: Path,
                   token: str) -> str:
    """In a Ray worker: check that this node shares the batch folder, take the batch's environment (the kernel that
    runs the notebooks inherits it), then run the point."""
    mark = folder / SHARED_MARK
    if not mark.is_file() or mark.read_text() != token:
        raise RuntimeError(f"node {socket.gethostname()} does not see the batch folder {folder} as the driver wrote "
                           "it: the project folder and output_dir must be on a filesystem every node mounts at the "
                           "same path (docs/sweeps.md)")
    os.environ.update(environment)
    return run(point, *args)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]
