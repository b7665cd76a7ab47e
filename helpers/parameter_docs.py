"""docs/parameters.md, made from the notebooks' parameters cells: every parameter, its default and the one-line help its
comment gives, and the notebooks that take it. A test holds the page to what this makes.

    python -m helpers.parameter_docs   # rewrite docs/parameters.md after changing a parameters cell
"""
from __future__ import annotations

import ast

from helpers.config import RunConfig
from helpers.paths import NOTEBOOKS, PROJECT_ROOT

PAGE = PROJECT_ROOT / "docs" / "parameters.md"
# Where a parameter's help is read from first: the notebooks that start runs, then the others.
ORDER = ("01_train_lora", "colab_end_to_end", "06_preference_dpo", "02_inference", "03_evaluate", "04_export",
         "05_batch", "00_setup")


def declared_parameters() -> dict[str, dict[str, tuple[str, str]]]:
    """{notebook: {parameter: (default as written, help)}} from each notebook's parameters cell."""
    import nbformat

    found = {}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        lines = cell.source.splitlines()
        found[path.stem] = {node.target.id: (ast.get_source_segment(cell.source, node.value),
                                             lines[node.lineno - 1].split("  # ", 1)[1].strip())
                            for node in ast.parse(cell.source).body if isinstance(node, ast.AnnAssign)}
    return found


def parameters_markdown() -> str:
    """The page: one row per RunConfig field, in the config's order."""
    declared = declared_parameters()
    order = [name for name in ORDER if name in declared] + sorted(set(declared) - set(ORDER))
    rows = []
    for name, default in RunConfig().to_dict().items():
        notebooks = [stem for stem in order if name in declared[stem]]
        written, help_text = declared[notebooks[0]][name]
        own = {stem: declared[stem][name][0] for stem in notebooks if declared[stem][name][0] != written}
        others = "; ".join(f"{stem}: `{value}`" for stem, value in own.items())
        cell = f"`{written}`" + (f" ({others})" if others else "")
        rows.append(f"| `{name}` | {cell} | {help_text.replace('|', '/')} | {', '.join(notebooks)} |")
    return "\n".join([
        "# Parameters",
        "",
        "Every parameter a notebook takes: one typed config, `helpers.config.RunConfig`, checked before anything slow "
        "starts (an unknown name is an error that suggests the closest one; a bad value names what is accepted). "
        "Set them in a notebook's parameters cell, with `papermill -p NAME VALUE`, in a profile "
        "(`notebooks/params/*.yaml`, `papermill -f`), or with `python -m helpers.pipeline -p NAME VALUE`. "
        "`papermill --help-notebook notebooks/01_train_lora.ipynb` prints the same for one notebook.",
        "",
        "This page is made by `python -m helpers.parameter_docs` from the notebooks' parameters cells; a test fails "
        "when it is out of date.",
        "",
        "| parameter | default | what it does | notebooks |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def main() -> None:
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(parameters_markdown(), encoding="utf-8")
    print(f"written {PAGE.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
