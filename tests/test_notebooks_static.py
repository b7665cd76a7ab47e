"""Checks that cost nothing: notebooks are clean, parameter cells are well-formed and in step with the config."""
from __future__ import annotations

import ast
import dataclasses

import nbformat
import papermill
import pytest
import yaml
from IPython.core.inputtransformer2 import TransformerManager

from helpers.config import DPO_DEFAULTS, END_TO_END_DEFAULTS, RunConfig
from helpers.pipeline import notebook_parameter_names
from helpers.paths import NOTEBOOKS, PROFILES

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
DEFAULTS = RunConfig().to_dict()
# The preference notebook's own defaults where DPO wants other values (helpers.config.DPO_DEFAULTS).
NOTEBOOK_DEFAULTS = {"06_preference_dpo": {**DEFAULTS, **DPO_DEFAULTS},
                     "colab_end_to_end": {**DEFAULTS, **END_TO_END_DEFAULTS}}


def parameters_cell(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name} has {len(cells)} parameters cells"
    return cells[0]


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOK_PATHS][:3] == ["00_setup", "01_train_lora", "02_inference"]


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {cell.id} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {cell.id} has an execution count"
    # Only the runtime request Colab reads (a T4 GPU) beside the kernel: no widget state, no run history.
    assert set(nb.metadata) <= {"kernelspec", "language_info", "accelerator", "colab"}
    assert nb.metadata.get("colab", {}) in ({}, {"gpuType": "T4", "provenance": []})


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_parameters_are_typed_commented_and_match_the_config(path):
    tree = ast.parse(parameters_cell(path).source)
    lines = parameters_cell(path).source.splitlines()
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: line {node.lineno} has no type annotation"
        name = node.target.id
        assert name in DEFAULTS, f"{path.name}: parameter {name} is not a RunConfig field"
        assert "  # " in lines[node.lineno - 1], f"{path.name}: parameter {name} has no comment"
        expected = NOTEBOOK_DEFAULTS.get(path.stem, DEFAULTS)[name]
        assert ast.literal_eval(node.value) == expected, f"{path.name}: default of {name} drifted from RunConfig"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """papermill's own parser (for --help-notebook and -p) must see every name, with its type and help."""
    inspected = papermill.inspect_notebook(str(path))
    assert set(inspected) == notebook_parameter_names(path)
    for name, info in inspected.items():
        assert info["inferred_type_name"] != "None" and info["help"], f"{path.name}: {name} lost its type or help"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_every_code_cell_compiles(path):
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            compile(TransformerManager().transform_cell(cell.source), f"{path.name}:{cell.id}", "exec")


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_cells_after_parameters_are_short_calls(path):
    """The notebook reads like a recipe: logic lives in helpers, each cell is a few lines."""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 6, f"{path.name} cell {cell.id} is too long for a recipe step"
            assert "def " not in cell.source and "class " not in cell.source


@pytest.mark.parametrize("profile", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_profiles_are_valid_configs(profile):
    params = yaml.safe_load(profile.read_text())
    assert params, f"{profile.name} is empty"
    RunConfig.from_dict(params)


def test_every_config_field_is_some_notebooks_parameter():
    declared = set().union(*(notebook_parameter_names(p) for p in NOTEBOOK_PATHS))
    missing = {f.name for f in dataclasses.fields(RunConfig)} - declared
    assert not missing, f"config fields no notebook accepts: {missing}"


def test_the_parameters_page_is_made_from_the_notebooks():
    from helpers.parameter_docs import PAGE, parameters_markdown

    assert PAGE.read_text(encoding="utf-8") == parameters_markdown(), \
        "docs/parameters.md is out of date: run `python -m helpers.parameter_docs`"
