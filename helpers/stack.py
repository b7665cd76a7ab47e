"""Imports unsloth before transformers, trl and peft: it patches them (and picks its CPU backend without a GPU)."""
import os

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network calls from a training run

import unsloth  # noqa: E402,F401  (must come first)
from unsloth import FastLanguageModel  # noqa: E402,F401
