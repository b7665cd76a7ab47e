"""Parameter profiles: a profile (notebooks/params/<name>.yaml) read and checked against the config, with the command
line's -p overrides on top."""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers.config import RunConfig
from helpers.paths import PROFILES


def profile_names() -> list[str]:
    """The profiles shipped in notebooks/params."""
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """A profile's parameters, checked against the config (unknown names and bad values are errors)."""
    import yaml

    path = PROFILES / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"profile {name!r} is unknown; choose one of: {', '.join(profile_names())}")
    params = yaml.safe_load(path.read_text()) or {}
    RunConfig.from_dict(params)
    return params


def default_profile() -> str:
    """colab_t4 where a CUDA GPU is present, else the offline cpu_tiny profile."""
    import torch

    return "colab_t4" if torch.cuda.is_available() else "cpu_tiny"


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """--profile and -p NAME VALUE, shared by the pipeline runner and the training entry point."""
    parser.add_argument("--profile", help=f"one of {profile_names()}; default: colab_t4 with a GPU, else cpu_tiny")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "YAML_VALUE"),
                        help="override one parameter, e.g. -p max_steps 30")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The -p NAME VALUE overrides, values parsed as YAML."""
    import yaml

    overrides = {}
    for name, value in args.param:
        try:
            overrides[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"-p {name} {value!r} is not a YAML value ({error.problem})") from None
    return overrides


def profile_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen profile's parameters with the -p overrides on top."""
    return {**load_profile(args.profile or default_profile()), **overrides_from(args)}


@contextlib.contextmanager
def refused_as_usage_error(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A bad profile, plan or parameter raised inside ends the command as argparse ends it on bad arguments: one
    `error:` line on stderr and exit status 2, not a traceback (notebooks keep the exception)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
