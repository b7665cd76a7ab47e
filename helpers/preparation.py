"""What the setup notebook prepares: the offline model when it is the one named, and a first look at the data."""
from __future__ import annotations

from pathlib import Path

from helpers.data import load_checked_rows
from helpers.local_models import TINY_MODEL_DIR, build_tiny_model


def prepare(config) -> dict:
    """Build the tiny offline model if config names it, check that the dataset loads; return what was found."""
    found = {}
    if Path(config.model_name) == Path(TINY_MODEL_DIR):
        found["tiny_model"] = str(build_tiny_model(config.model_name))
    rows = load_checked_rows(config)
    found["dataset_rows"] = len(rows)
    found["example"] = {k: rows[0][k] for k in (config.prompt_field, config.response_field)}
    return found
