"""One typed configuration for every notebook, validated before anything slow starts."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.environment import RUN_DIR, default_run_dir, mount_drive_if_needed
from helpers.paths import kit_repo
from helpers.prompts import PROMPT_TEMPLATES
from helpers.run_guard import complete_overwrite

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Projection names of Llama-like models, the fused ones some architectures use, and the embeddings.
LORA_TARGETS = (*SEVEN_PROJECTIONS, "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head")
# A curated subset of transformers' OptimizerNames and SchedulerType (a test keeps them in step).
OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused",
              "adafactor", "sgd", "lion_8bit")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
LONG_ROWS = ("truncate", "drop")
RESUME = ("auto", "never")
REPORT_TO = ("none", "tensorboard", "wandb")
MICRO_BATCHING = ("auto", "recipe")
EXPORT_FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf", "gguf_lora")
# A curated subset of trl's DPOConfig.loss_type values: the pairwise losses that need nothing but chosen/rejected.
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down")
DPO_REFERENCES = ("base", "sft")
GGUF_QUANTIZATIONS = ("q4_k_m", "q5_k_m", "q8_0", "f16", "bf16")
DEFAULT_PROMPTS = [
    "What's your favorite way to spend a rainy Sunday?",
    "Any tips for staying motivated when working from home?",
    "Do you think it's weird to eat cereal for dinner?",
]
# The question every export is checked with, and its model card's usage example asks: the first default prompt.
CHECK_PROMPT = DEFAULT_PROMPTS[0]


@dataclass
class RunConfig:
    """Every parameter a notebook accepts; defaults are the tutorial's recipe on a Colab T4."""

    # model
    model_name: str = "unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit"
    max_seq_length: int = 2048
    load_in_4bit: bool = True
    precision: str = "auto"
    max_gpu_memory_gib: float = 0.0
    # data
    dataset: str = "HumanLLMs/Human-Like-DPO-Dataset"
    dataset_split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "chosen"
    rejected_field: str = "rejected"
    prompt_template: str = "alpaca"
    system_prompt: str = ""
    train_on_responses_only: bool = False
    long_rows: str = "truncate"
    # LoRA
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    # training
    learning_rate: float = 2e-4
    max_steps: int | None = 120
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    micro_batching: str = "auto"
    warmup_steps: int = 5
    weight_decay: float = 0.01
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_8bit"
    seed: int = 3407
    lora_random_state: int = 3927
    logging_steps: int = 1
    report_to: str = "none"
    packing: bool = False
    run_dir: str = RUN_DIR
    num_processes: int = 1
    # reliability
    save_steps: int = 20
    save_total_limit: int = 2
    resume: str = "auto"
    overwrite: bool = False
    # evaluation
    eval_fraction: float = 0.05
    eval_steps: int = 20
    training_eval_rows: int | None = None
    max_eval_rows: int = 200
    # inference
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 256
    temperature: float = 0.0
    # export and sharing
    formats: list[str] = field(default_factory=lambda: ["lora"])
    gguf_quantization: str = "q8_0"
    push_to_hub: bool = False
    hub_repo_id: str = ""
    private: bool = True
    dry_run: bool = False
    # preference tuning (DPO)
    sft_run_dir: str = ""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    reference: str = "base"
    # evaluation of several runs on the same held-out rows
    compare_runs: list[str] = field(default_factory=list)
    # batch runs
    batch_plan: str = "notebooks/plans/cpu_tiny_grid.yaml"
    batch_workers: int | str = ""
    # Colab: where to clone this kit from when a notebook is opened on its own
    kit_repo: str = field(default_factory=kit_repo)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), _field_types()[f.name]))
        for name in ("max_seq_length", "lora_r", "lora_alpha", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "max_new_tokens", "save_steps",
                     "save_total_limit", "eval_steps", "max_eval_rows", "num_processes"):
            _require(name, getattr(self, name), getattr(self, name) > 0, "a positive integer")
        if self.training_eval_rows is not None:
            _require("training_eval_rows", self.training_eval_rows, self.training_eval_rows >= 0,
                     "zero (no held-out loss while training), a positive integer, or None (about a tenth of the "
                     "training time)")
        if self.max_steps is not None:
            _require("max_steps", self.max_steps, self.max_steps > 0, "a positive integer, or None to train by epochs")
        _require("num_train_epochs", self.num_train_epochs, self.num_train_epochs > 0, "a positive number")
        _require("learning_rate", self.learning_rate, 0 < self.learning_rate < 1, "a number between 0 and 1")
        _require("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "zero or a positive integer")
        _require("weight_decay", self.weight_decay, self.weight_decay >= 0, "zero or a positive number")
        _require("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "a number in [0, 1)")
        _require("max_gpu_memory_gib", self.max_gpu_memory_gib, self.max_gpu_memory_gib >= 0,
                 "0 (no cap) or a positive number of GiB")
        _require("temperature", self.temperature, self.temperature >= 0, "zero (greedy) or a positive number")
        for name in ("model_name", "dataset", "dataset_split", "prompt_field", "response_field", "run_dir"):
            _require(name, getattr(self, name), bool(getattr(self, name).strip()), "a non-empty string")
        _choose("prompt_template", self.prompt_template, PROMPT_TEMPLATES)
        _choose("optim", self.optim, OPTIMIZERS)
        _choose("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _choose("precision", self.precision, PRECISIONS)
        _choose("long_rows", self.long_rows, LONG_ROWS)
        _choose("resume", self.resume, RESUME)
        _choose("report_to", self.report_to, REPORT_TO)
        _choose("micro_batching", self.micro_batching, MICRO_BATCHING)
        _require("eval_fraction", self.eval_fraction, 0 <= self.eval_fraction <= 0.5,
                 "a number in [0, 0.5] (0 turns held-out evaluation off)")
        _require("formats", self.formats, bool(self.formats), "a non-empty list")
        for export_format in self.formats:
            _choose("formats", export_format, EXPORT_FORMATS)
        _choose("gguf_quantization", self.gguf_quantization, GGUF_QUANTIZATIONS)
        if self.push_to_hub or self.hub_repo_id:
            _require("hub_repo_id", self.hub_repo_id, re.fullmatch(r"[\w.-]+/[\w.-]+", self.hub_repo_id) is not None,
                     "'owner/name' when push_to_hub is set")
        _require("target_modules", self.target_modules, bool(self.target_modules), "a non-empty list")
        for module in self.target_modules:
            _choose("target_modules", module, LORA_TARGETS)
        _require("beta", self.beta, self.beta > 0, "a positive number")
        _choose("loss_type", self.loss_type, DPO_LOSSES)
        _choose("reference", self.reference, DPO_REFERENCES)
        if self.reference == "sft":
            _require("reference", self.reference, bool(self.sft_run_dir.strip()),
                     "'base' when no sft_run_dir is given (the 'sft' reference is a frozen copy of that run's adapter)")
        _require("prompts", self.prompts, all(p.strip() for p in self.prompts), "a list of non-empty strings")
        _require("batch_workers", self.batch_workers,
                 self.batch_workers == "" or points_at_once(self.batch_workers) is not None,
                 "'' (the plan's workers), 'auto' (one point per GPU) or a positive number of points run at once")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of every parameter."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build and validate a config; unknown names are errors that list the accepted ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in values if name not in known]
        if unknown:
            hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, known, 1))
                     else repr(name) for name in unknown]
            raise ValueError(f"unknown parameter(s): {', '.join(hints)}; accepted parameters: {', '.join(known)}")
        return cls(**values)


# The preference notebook's own defaults where DPO wants other values than SFT: a learning rate far below SFT's
# (unsloth's DPO notebook uses 5e-6), shorter runs (each step scores chosen and rejected, policy and reference),
# its own run_dir, and the SFT run of 01_train_lora to start from.
DPO_DEFAULTS = {"sft_run_dir": "outputs/lora-run", "run_dir": "outputs/dpo-run", "learning_rate": 5e-6,
                "max_steps": 60, "max_seq_length": 1024}
# What a DPO run continuing an SFT run takes from it: the same model, adapter shape, prompt format and data.
INHERITED_FROM_SFT = ("model_name", "load_in_4bit", "dataset", "dataset_split", "prompt_field", "response_field",
                      "rejected_field", "prompt_template", "system_prompt", "lora_r", "lora_alpha", "lora_dropout",
                      "target_modules", "eval_fraction")


# Names IPython and Jupyter put into a kernel's namespace, which are not parameters.
_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
# Where notebook_parameters remembers, in the kernel, which names were there at its first call.
_PARAMETER_NAMES = "_notebook_parameter_names"


def notebook_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """The parameters in a notebook's globals: the names its parameters cell declares (typed, so IPython lists
    them in __annotations__; papermill's injected cell only assigns) and the plain values already there at the
    first call (papermill's injected names, a misspelt one included, so that it is refused). Names the notebook's
    own cells bind later (config, rows, ...) are not parameters, so a check cell can be run again in Jupyter."""
    if _PARAMETER_NAMES not in namespace:
        namespace[_PARAMETER_NAMES] = {
            name for name, value in namespace.items()
            if not name.startswith("_") and name not in _KERNEL_NAMES
            and not isinstance(value, types.ModuleType) and not callable(value)
        }
    names = namespace[_PARAMETER_NAMES] | set(namespace.get("__annotations__", {}))
    return {name: value for name, value in namespace.items() if name in names}


# The end-to-end notebook's own default: an empty run_dir is the default place (on Colab, Google Drive).
END_TO_END_DEFAULTS = {"run_dir": ""}


def notebook_config(namespace: dict[str, Any]) -> RunConfig:
    """The validated config of a notebook that starts a run (setup, training, end to end); an empty run_dir
    means the default place for runs (helpers.environment.default_run_dir)."""
    params = notebook_parameters(namespace)
    if params.get("run_dir") == "":
        params["run_dir"] = default_run_dir()
    return RunConfig.from_dict(params)


def run_config(namespace: dict[str, Any]) -> RunConfig:
    """The config of a notebook that works on a finished run: what the run recorded, then this notebook's values."""
    params = notebook_parameters(namespace)
    RunConfig.from_dict(params)  # unknown names and bad values fail here, before run_dir is read
    run_dir = str(Path(params.get("run_dir", RunConfig.run_dir)))
    record = _run_record(run_dir, f"run_dir {run_dir!r} holds no training run (run 01_train_lora first, with the "
                                  "same run_dir)")
    return RunConfig.from_dict({**record["parameters"], **params})


def preference_config(namespace: dict[str, Any]) -> RunConfig:
    """The config of the DPO notebook. With sft_run_dir, the SFT run's model, adapter shape, prompt format and data
    (INHERITED_FROM_SFT) are taken from its run.json: a value left at its default is inherited, one set to
    something else must agree with the SFT run."""
    params = notebook_parameters(namespace)
    config = RunConfig.from_dict(params)
    if not config.rejected_field.strip():
        raise ValueError("rejected_field = '' is invalid for preference tuning; it must name the column of the "
                         "dispreferred answers")
    if not config.sft_run_dir:
        return config
    if Path(config.sft_run_dir).resolve() == Path(config.run_dir).resolve():
        raise ValueError(f"run_dir {config.run_dir!r} is the sft_run_dir: DPO would write over the SFT run it "
                         "continues (with overwrite=True, remove the adapter it starts from); choose another run_dir")
    record = _run_record(config.sft_run_dir, f"sft_run_dir {config.sft_run_dir!r} holds no training run (run "
                         "01_train_lora there first, or set sft_run_dir='' to start from the base model)")
    if record.get("status") != "finished" or not (Path(config.sft_run_dir) / "adapter").is_dir():
        raise ValueError(f"sft_run_dir {config.sft_run_dir!r} holds an unfinished run (status "
                         f"{record.get('status')!r}); finish it with 01_train_lora first")
    sft, defaults = record["parameters"], RunConfig().to_dict()
    clashes = [f"{name} {params[name]!r} here, {sft[name]!r} in the SFT run" for name in INHERITED_FROM_SFT
               if name in params and params[name] not in (defaults[name], sft[name])]
    if clashes:
        raise ValueError(f"sft_run_dir {config.sft_run_dir!r} was trained with other settings ({'; '.join(clashes)}); "
                         "DPO continues that run's adapter, so leave these at their defaults to inherit them")
    return RunConfig.from_dict({**params, **{name: sft[name] for name in INHERITED_FROM_SFT}})


def _run_record(run_dir: str, missing: str) -> dict[str, Any]:
    """run_dir/run.json, read after mounting Drive on Colab when run_dir lies there (a run handed over on Drive
    is there only then) and after an overwrite that finished has taken its place (one a kill left half done
    included); FileNotFoundError saying `missing` when there is none."""
    mount_drive_if_needed(run_dir)
    complete_overwrite(run_dir)
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {missing}")
    return json.loads(path.read_text())


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _check_type(name: str, value: Any, expected: Any) -> Any:
    """Return value (an int widened to float where a float is expected) or raise naming the expected type."""
    args = typing.get_args(expected)
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        accepted = [a for a in args if a is not type(None)]
        if len(accepted) > 1:  # e.g. int | str: a value of any of them, as it is
            if any(isinstance(value, a) and not (a is int and isinstance(value, bool)) for a in accepted):
                return value
            raise ValueError(f"{name} must be {' or '.join(a.__name__ for a in accepted)}, got {value!r} "
                             f"({type(value).__name__})")
        (expected,) = accepted
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list) and all(isinstance(v, item) for v in value):
            return value
        raise ValueError(f"{name} must be a list of {item.__name__}, got {value!r}")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{name} must be {expected.__name__}, got {value!r} ({type(value).__name__})")


def points_at_once(workers: Any) -> int | str | None:
    """A batch's workers as a positive number (digits in a string too) or 'auto'; None when it is neither."""
    if isinstance(workers, str) and workers.strip().isdigit():
        workers = int(workers)
    if workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers > 0):
        return workers
    return None


def _require(name: str, value: Any, ok: bool, accepted: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r} is invalid; it must be {accepted}")


def _choose(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} {value!r} is unknown; choose one of: {', '.join(accepted)}")
