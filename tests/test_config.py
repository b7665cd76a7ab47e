"""RunConfig: tutorial defaults, validation with helpful messages, notebook namespaces, recorded runs."""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers.config import (
    DEFAULT_PROMPTS,
    LORA_TARGETS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    SEVEN_PROJECTIONS,
    RunConfig,
    notebook_config,
    notebook_parameters,
    run_config,
)
from helpers.paths import NOTEBOOKS

# ---------------------------------------------------------------- defaults


# The tutorial's recipe, field by field (bias "none" and gradient checkpointing "unsloth" are fixed in add_lora).
TUTORIAL_RECIPE = {
    "model_name": "unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit",
    "max_seq_length": 2048,
    "load_in_4bit": True,
    "dataset": "HumanLLMs/Human-Like-DPO-Dataset",
    "prompt_field": "prompt",
    "response_field": "chosen",
    "prompt_template": "alpaca",
    "lora_r": 64,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "lora_random_state": 3927,
    "seed": 3407,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "warmup_steps": 5,
    "max_steps": 120,
    "learning_rate": 2e-4,
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
}


def _parameters_cell_source(notebook: Path) -> str:
    (cell,) = [c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    return cell.source


def _parameters_cell_values(notebook: Path) -> dict:
    return {node.target.id: ast.literal_eval(node.value) for node in ast.parse(_parameters_cell_source(notebook)).body}


@pytest.mark.parametrize("place", ["colab_t4.yaml", "RunConfig defaults", "01_train_lora parameters cell"])
def test_the_tutorial_recipe_is_stated_field_by_field(place):
    read = {"colab_t4.yaml": lambda: yaml.safe_load((NOTEBOOKS / "params/colab_t4.yaml").read_text()),
            "RunConfig defaults": lambda: RunConfig().to_dict(),
            "01_train_lora parameters cell": lambda: _parameters_cell_values(NOTEBOOKS / "01_train_lora.ipynb")}
    values = read[place]()
    drifted = {name: values.get(name, "(missing)") for name, value in TUTORIAL_RECIPE.items()
               if values.get(name, "(missing)") != value or type(values.get(name)) is not type(value)}
    assert not drifted, f"{place} departs from the tutorial's recipe: {drifted}"


def test_lora_is_added_with_the_tutorials_bias_checkpointing_and_init_seed(monkeypatch):
    from helpers import modeling

    calls = []
    monkeypatch.setattr(modeling.FastLanguageModel, "get_peft_model", lambda model, **kwargs: calls.append(kwargs))
    modeling.add_lora(object(), RunConfig())
    (kwargs,) = calls
    assert (kwargs["bias"], kwargs["use_gradient_checkpointing"]) == ("none", "unsloth")
    assert (kwargs["r"], kwargs["lora_alpha"], kwargs["random_state"]) == (64, 16, 3927)


def test_default_lists_are_not_shared():
    a, b = RunConfig(), RunConfig()
    a.target_modules.append("lm_head")
    a.prompts.append("extra")
    assert b.target_modules == SEVEN_PROJECTIONS
    assert b.prompts == DEFAULT_PROMPTS
    assert SEVEN_PROJECTIONS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- unknown names


def test_from_dict_unknown_name_suggests_close_match_and_lists_accepted():
    with pytest.raises(ValueError, match=r"unknown parameter.*'learnig_rate'.*did you mean 'learning_rate'") as info:
        RunConfig.from_dict({"learnig_rate": 1e-4})
    message = str(info.value)
    assert "accepted parameters:" in message
    for name in ("model_name", "lora_r", "max_steps", "learning_rate", "run_dir"):
        assert name in message.split("accepted parameters:")[1]


def test_from_dict_unknown_name_without_close_match_is_still_named():
    with pytest.raises(ValueError, match=r"unknown parameter.*'zzzz'") as info:
        RunConfig.from_dict({"zzzz": 1})
    assert "did you mean" not in str(info.value)


def test_from_dict_names_every_unknown_name():
    with pytest.raises(ValueError, match=r"'lora_rr'.*'max_step'"):
        RunConfig.from_dict({"lora_rr": 8, "max_step": 3})


# ---------------------------------------------------------------- bad choices


@pytest.mark.parametrize("name, value, accepted", [
    ("prompt_template", "alpacca", ("alpaca",)),
    ("optim", "adamw_9bit", OPTIMIZERS),
    ("lr_scheduler_type", "cosinus", SCHEDULERS),
    ("precision", "fp8", PRECISIONS),
])
def test_unknown_choice_names_value_and_accepted_values(name, value, accepted):
    with pytest.raises(ValueError, match=rf"{name} '{value}' is unknown") as info:
        RunConfig.from_dict({name: value})
    for choice in accepted:
        assert choice in str(info.value)


def test_unknown_target_module_names_value_and_accepted_values():
    with pytest.raises(ValueError, match=r"target_modules 'q_projection' is unknown") as info:
        RunConfig(target_modules=["q_proj", "q_projection"])
    for choice in LORA_TARGETS:
        assert choice in str(info.value)


def test_empty_target_modules_is_an_error():
    with pytest.raises(ValueError, match=r"target_modules .*non-empty list"):
        RunConfig(target_modules=[])


@pytest.mark.parametrize("modules", [["q_proj"], ["qkv_proj", "gate_up_proj"], list(LORA_TARGETS)])
def test_known_target_modules_are_accepted(modules):
    assert RunConfig(target_modules=modules).target_modules == modules


# ---------------------------------------------------------------- bad numbers


@pytest.mark.parametrize("name, value", [
    ("max_seq_length", 0),
    ("lora_r", -1),
    ("lora_alpha", 0),
    ("per_device_train_batch_size", 0),
    ("max_steps", 0),
    ("max_steps", -5),
    ("gradient_accumulation_steps", 0),
    ("logging_steps", 0),
    ("max_new_tokens", 0),
])
def test_non_positive_sizes_and_steps_are_errors(name, value):
    with pytest.raises(ValueError, match=rf"{name} = {value} is invalid; it must be a positive integer"):
        RunConfig.from_dict({name: value})


@pytest.mark.parametrize("name, value, accepted", [
    ("learning_rate", 0.0, "between 0 and 1"),
    ("learning_rate", 1.5, "between 0 and 1"),
    ("num_train_epochs", 0.0, "positive number"),
    ("warmup_steps", -1, "zero or a positive integer"),
    ("weight_decay", -0.1, "zero or a positive number"),
    ("lora_dropout", 1.0, r"\[0, 1\)"),
    ("temperature", -0.5, "zero"),
])
def test_out_of_range_numbers_are_errors(name, value, accepted):
    with pytest.raises(ValueError, match=rf"{name} = {re.escape(repr(value))} is invalid.*{accepted}"):
        RunConfig.from_dict({name: value})


@pytest.mark.parametrize("name", ["model_name", "dataset", "prompt_field", "response_field", "run_dir"])
def test_blank_strings_are_errors(name):
    with pytest.raises(ValueError, match=rf"{name} = '  ' is invalid; it must be a non-empty string"):
        RunConfig.from_dict({name: "  "})


def test_blank_prompt_is_an_error():
    with pytest.raises(ValueError, match=r"prompts .*non-empty strings"):
        RunConfig(prompts=["Hello?", " "])


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("name, value, expected", [
    ("max_steps", "10", "int"),
    ("load_in_4bit", "yes", "bool"),
    ("lora_r", True, "int"),
    ("lora_r", 2.5, "int"),
    ("learning_rate", "2e-4", "float"),
    ("learning_rate", True, "float"),
    ("model_name", 7, "str"),
])
def test_wrong_types_are_errors_naming_the_expected_type(name, value, expected):
    with pytest.raises(ValueError, match=rf"{name} must be {expected}, got {re.escape(repr(value))}"):
        RunConfig.from_dict({name: value})


@pytest.mark.parametrize("name, value", [
    ("target_modules", "q_proj"),
    ("target_modules", ["q_proj", 1]),
    ("prompts", "Hello?"),
])
def test_lists_must_be_lists_of_strings(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a list of str"):
        RunConfig.from_dict({name: value})


def test_tuple_is_accepted_as_a_list():
    config = RunConfig(target_modules=("q_proj", "v_proj"))
    assert config.target_modules == ["q_proj", "v_proj"]
    assert isinstance(config.target_modules, list)


def test_int_is_widened_for_a_float_field():
    config = RunConfig.from_dict({"weight_decay": 0, "num_train_epochs": 3})
    assert config.weight_decay == 0.0 and type(config.weight_decay) is float
    assert config.num_train_epochs == 3.0 and type(config.num_train_epochs) is float


def test_max_steps_none_trains_by_epochs():
    config = RunConfig.from_dict({"max_steps": None, "num_train_epochs": 2})
    assert config.max_steps is None
    assert config.num_train_epochs == 2.0


def test_none_is_rejected_where_not_optional():
    with pytest.raises(ValueError, match=r"lora_r must be int, got None"):
        RunConfig.from_dict({"lora_r": None})


# ---------------------------------------------------------------- round trip


def test_to_dict_round_trips_through_from_dict_and_json():
    config = RunConfig(lora_r=8, max_steps=None, target_modules=["q_proj", "v_proj"], prompts=["Hi?"],
                       optim="adamw_torch", lr_scheduler_type="cosine", precision="fp32", weight_decay=0)
    values = config.to_dict()
    assert values["lora_r"] == 8 and values["max_steps"] is None
    assert RunConfig.from_dict(values) == config
    assert RunConfig.from_dict(json.loads(json.dumps(values))) == config
    values["target_modules"].append("k_proj")  # to_dict hands back copies
    assert config.target_modules == ["q_proj", "v_proj"]


# ---------------------------------------------------------------- transformers names


def test_curated_optimizers_and_schedulers_exist_in_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    optimizers = {o.value for o in OptimizerNames}
    schedulers = {s.value for s in SchedulerType}
    assert [o for o in OPTIMIZERS if o not in optimizers] == []
    assert [s for s in SCHEDULERS if s not in schedulers] == []
    assert RunConfig().optim in optimizers and RunConfig().lr_scheduler_type in schedulers


# ---------------------------------------------------------------- notebooks


def _a_function():
    return 1


class _AClass:
    pass


def test_notebook_parameters_keeps_plain_values_only():
    namespace = {
        "lora_r": 8,
        "learning_rate": 1e-4,
        "max_steps": None,
        "target_modules": ["q_proj"],
        "run_dir": "x",
        "math": math,
        "helper": _a_function,
        "square": lambda x: x * x,
        "RunConfig": RunConfig,
        "AClass": _AClass,
        "_": 5,
        "__name__": "__main__",
        "_private": 3,
        "In": ["", "x = 1"],
        "Out": {1: 2},
        "get_ipython": object(),
        "exit": object(),
        "quit": object(),
    }
    assert notebook_parameters(namespace) == {
        "lora_r": 8, "learning_rate": 1e-4, "max_steps": None, "target_modules": ["q_proj"], "run_dir": "x",
    }


def test_notebook_config_validates_parameters():
    config = notebook_config({"lora_r": 8, "max_steps": 3, "json": json, "__doc__": None})
    assert (config.lora_r, config.max_steps) == (8, 3)
    assert config.learning_rate == 2e-4  # default kept


# Runs in its own interpreter: an IPython shell takes over sys.modules["__main__"] and builtins.
CHECK_CELL_TWICE = """
import json, sys
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

config = Config()
config.HistoryManager.hist_file = ":memory:"
shell = InteractiveShell(config=config)
shell.run_cell(sys.stdin.read())  # the parameters cell: typed, so IPython annotates its names
shell.run_cell("max_steps = 3")  # as papermill injects a value: an assignment
check = "import helpers.config; config = helpers.config.notebook_config(globals())"
runs = []
for _ in range(2):  # the second time, config, rows and precision are globals of the notebook's own making
    result = shell.run_cell(check)
    runs.append([result.success, repr(result.error_in_exec), shell.user_ns["config"].max_steps])
    shell.run_cell("rows = [{'prompt': 'a'}]; precision = 'fp32'")
print(json.dumps({"runs": runs, "annotated": sorted(shell.user_ns["__annotations__"])}))
"""


def test_the_check_cell_can_run_again_after_later_cells_bound_names():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CHECK_CELL_TWICE], check=True, capture_output=True, text=True,
                         input=_parameters_cell_source(NOTEBOOKS / "01_train_lora.ipynb")).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["runs"] == [[True, "None", 3], [True, "None", 3]]
    assert {"max_steps", "lora_r"} <= set(result["annotated"]) and "rows" not in result["annotated"]


def test_a_misspelt_injected_name_is_refused_and_stays_refused():
    namespace = {"__annotations__": {"lora_r": int}, "lora_r": 8, "learnig_rate": 0.1}
    for _ in range(2):
        with pytest.raises(ValueError, match=r"'learnig_rate' \(did you mean 'learning_rate'\?\)"):
            notebook_config(namespace)


def test_notebook_config_unknown_name_raises():
    with pytest.raises(ValueError, match=r"unknown parameter.*'lora_rank'.*accepted parameters"):
        notebook_config({"lora_r": 8, "lora_rank": 8})


def test_notebook_config_bad_value_raises():
    with pytest.raises(ValueError, match=r"optim 'adam' is unknown"):
        notebook_config({"optim": "adam"})


def _record_run(directory, **parameters):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(json.dumps({"parameters": RunConfig(**parameters).to_dict()}))


def test_run_config_is_recorded_values_overridden_by_namespace(tmp_path):
    run_dir = tmp_path / "run"
    _record_run(run_dir, lora_r=8, max_steps=7, dataset="data.jsonl", max_new_tokens=64, run_dir=str(run_dir))
    config = run_config({"run_dir": str(run_dir), "max_new_tokens": 16, "json": json, "_x": 1})
    assert config.lora_r == 8  # recorded
    assert config.max_steps == 7  # recorded
    assert config.dataset == "data.jsonl"  # recorded
    assert config.max_new_tokens == 16  # the notebook's value wins
    assert config.run_dir == str(run_dir)


def test_run_config_without_recorded_run_points_to_training_notebook(tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"run\.json.*01_train_lora"):
        run_config({"run_dir": str(run_dir)})


def test_run_config_checks_namespace_before_reading_run_dir(tmp_path):
    with pytest.raises(ValueError, match=r"'max_new_token'.*did you mean 'max_new_tokens'"):
        run_config({"run_dir": str(tmp_path / "missing"), "max_new_token": 5})


def test_notebook_parameters_drops_any_callable():
    import functools
    import math
    from time import time

    namespace = {"lora_r": 8, "time": time, "sqrt": math.sqrt, "part": functools.partial(print)}
    assert notebook_parameters(namespace) == {"lora_r": 8}
