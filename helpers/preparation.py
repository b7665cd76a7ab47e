"""What the setup notebook prepares: a locally built model when it is the one named, and a first look at the data."""
from __future__ import annotations

from helpers.data import load_checked_rows
from helpers.local_models import local_model_builder


def prepare(config) -> dict:
    """Build the model if config names a locally built one (the tiny Llama, SmolLM2), check that the dataset loads;
    return what was found."""
    found = {}
    if (build := local_model_builder(config.model_name)) is not None:
        found["local_model"] = str(build(config.model_name))
    rows = load_checked_rows(config)
    found["dataset_rows"] = len(rows)
    found["example"] = {k: rows[0][k] for k in (config.prompt_field, config.response_field)}
    return found
