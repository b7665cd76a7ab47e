"""Where the project's files are (notebooks, profiles, plans, README), and the kit's git URL, read from
helpers/data/kit.json (written by `make publish`, read by the notebooks' kit_repo default and the Colab badges)."""
from __future__ import annotations

import json
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT_ROOT / "notebooks"
PROFILES = NOTEBOOKS / "params"
PLANS = NOTEBOOKS / "plans"
README = PROJECT_ROOT / "README.md"
KIT_FILE = Path(__file__).parent / "data" / "kit.json"


def kit_repo() -> str:
    """The kit's git URL as published (empty until `make publish` sets it)."""
    return json.loads(KIT_FILE.read_text(encoding="utf-8"))["kit_repo"]
