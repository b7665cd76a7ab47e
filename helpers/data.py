"""Loading training rows from a local file or the Hub (and the one rule telling a local path from a Hub id), checking
them, and rendering them as training text."""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from helpers.prompts import format_generation_prompt, with_one_eos

log = logging.getLogger(__name__)

SAMPLE_DATASET = Path(__file__).parent / "data" / "sample_dpo.jsonl"
LOCAL_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def is_local_path(name: str, root: str | Path = ".") -> bool:
    """True when a model, dataset or export name means a file or folder here rather than a Hugging Face Hub id
    (owner/name): it is written as a path (/, ., ~ or outputs/ first), is deeper than owner/name, or ends in a
    data file's extension. A name shaped like a Hub id stays a Hub id even where a folder of that name exists
    (from root): a stray folder never redirects it, and a warning says so once (write ./name for the folder)."""
    local = (name.startswith(("/", ".", "~", "outputs/")) or name.count("/") > 1
             or Path(name).suffix.lower() in LOCAL_FORMATS)
    if not local and (Path(root) / name).exists():
        _warn_hub_id_shadowed(name, str(Path(root) / name))
    return local


@functools.cache
def _warn_hub_id_shadowed(name: str, folder: str) -> None:
    log.warning("%r is read as a Hugging Face Hub id, not as the local %s of that name (%s); write './%s' to use "
                "the local one", name, "folder" if Path(folder).is_dir() else "file", folder, name)


def read_local_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl, .json, .csv or .parquet file, as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise ValueError(f"dataset file {str(path)!r} has format {suffix or '(none)'!r}; "
                         f"accepted formats: {', '.join(LOCAL_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        _require_objects(rows, path)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON at line {error.lineno} ({error.msg})") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of objects (or {{\"data\": [...]}}), got {type(rows).__name__}")
        _require_objects(rows, path)
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a byte-order mark
            return list(csv.DictReader(handle))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _require_objects(rows: list, path: Path) -> None:
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is a {type(row).__name__}, not an object with named fields")


def load_rows(dataset: str, split: str = "train", revision: str | None = None) -> list[dict[str, Any]]:
    """All rows of a local file or of a Hub dataset's split (at a commit when revision is given)."""
    if is_local_path(dataset):
        return read_local_rows(dataset)
    from datasets import load_dataset

    try:
        return load_dataset(dataset, split=split, revision=revision).to_list()
    except Exception as error:  # the Hub raises many kinds; all mean the same to the user
        at = f" at revision {revision}" if revision else ""
        raise RuntimeError(
            f"could not load dataset {dataset!r} (split {split!r}{at}) from the Hugging Face Hub: {error}. "
            f"Offline? Use a local file (dataset=path/to/data.jsonl) or the cpu_tiny profile."
        ) from error


def hub_revision(dataset: str) -> str | None:
    """The commit a Hub dataset is at now; None for a local file or where the Hub cannot be asked (offline)."""
    if is_local_path(dataset):
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(dataset).sha
    except Exception as error:  # offline, unreachable, gated: the split is then recorded without a revision
        log.warning("the revision of Hub dataset %r is unknown (%s); split.json records none", dataset, error)
        return None


def check_rows(rows: list[dict[str, Any]], fields: dict[str, str], source: str) -> None:
    """Raise a ValueError naming the problem when rows are empty, lack a field, or hold empty/non-text values."""
    if not rows:
        raise ValueError(f"dataset {source!r} is empty: no rows to train on")
    found = list(rows[0].keys())
    for parameter, column in fields.items():
        if column not in rows[0]:
            raise ValueError(f"{parameter} {column!r} is not a column of {source!r}; columns found: {', '.join(found)}")
    for number, row in enumerate(rows, start=1):
        for parameter, column in fields.items():
            value = row.get(column)
            if parameter == "prompt_field" and isinstance(value, list) and value:
                continue  # a conversation, checked when it was mapped (from_conversations)
            if not isinstance(value, str):
                raise ValueError(f"{source!r} row {number}: column {column!r} holds {type(value).__name__} "
                                 f"{value!r}, not text")
            if not value.strip():
                raise ValueError(f"{source!r} row {number}: column {column!r} is empty")


CONVERSATION_COLUMNS = ("messages", "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def from_conversations(rows: list[dict[str, Any]], config, source: str) -> list[dict[str, Any]]:
    """Rows in conversation form (`messages` of {role, content}, or ShareGPT `conversations` of {from, value})
    mapped to prompt/response rows: the prompt is every turn before the last assistant turn, the response that
    turn. Other columns (a `rejected` answer, say) are kept. Rows already in prompt/response form pass through.
    The alpaca template takes only one user turn and its answer: longer conversations are refused under it."""
    if not rows or config.prompt_field in rows[0]:
        return rows
    column = next((c for c in CONVERSATION_COLUMNS if c in rows[0]), None)
    if column is None:
        return rows
    mapped = []
    for number, row in enumerate(rows, start=1):
        turns = row[column]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{source!r} row {number}: column {column!r} is not a list of messages")
        try:
            messages = [{"role": SHAREGPT_ROLES[t.get("role", t.get("from"))], "content": t.get("content", t.get("value"))}
                        for t in turns]
        except KeyError as error:
            raise ValueError(f"{source!r} row {number}: unknown role {error.args[0]!r}; accepted roles: "
                             f"{', '.join(SHAREGPT_ROLES)}") from None
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
            raise ValueError(f"{source!r} row {number}: a conversation must end with a user turn and then an "
                             "assistant turn")
        for message in messages:
            if not isinstance(message["content"], str) or not message["content"].strip():
                raise ValueError(f"{source!r} row {number}: a {message['role']} message is empty or not text")
        if config.prompt_template == "alpaca" and len(messages) > 2:
            raise ValueError(f"{source!r} row {number}: a conversation of {len(messages)} turns (roles "
                             f"{', '.join(m['role'] for m in messages)}), but prompt_template 'alpaca' holds one "
                             "instruction and one response and would drop the other turns; use "
                             "prompt_template=\"chat\" for conversations")
        others = {k: v for k, v in row.items() if k != column}
        mapped.append({**others, config.prompt_field: messages[:-1], config.response_field: messages[-1]["content"]})
    log.info("mapped %d conversations from column %r to prompt/response rows", len(mapped), column)
    return mapped


class CheckedRows(list):
    """The dataset's rows as load_checked_rows returns them, with the seconds loading and checking them took."""

    seconds: float = 0.0


def load_checked_rows(config, preference: bool = False) -> CheckedRows:
    """The configured dataset's rows (conversations mapped to prompt/response), checked for the fields the
    config uses, before any model loads. For preference tuning the rejected answers are checked too, and a row
    whose two answers are the same (it would teach nothing) is an error."""
    started = time.perf_counter()
    rows = from_conversations(load_rows(config.dataset, config.dataset_split), config, config.dataset)
    fields = {"prompt_field": config.prompt_field, "response_field": config.response_field}
    check_rows(rows, {**fields, "rejected_field": config.rejected_field} if preference else fields, config.dataset)
    if preference:
        _refuse_identical_answers(rows, config)
    log.info("loaded %d rows from %s", len(rows), config.dataset)
    checked = CheckedRows(rows)
    checked.seconds = time.perf_counter() - started
    return checked


def _refuse_identical_answers(rows: list[dict[str, Any]], config) -> None:
    same = [number for number, row in enumerate(rows, start=1)
            if row[config.response_field].strip() == row[config.rejected_field].strip()]
    if same:
        shown = ", ".join(map(str, same[:10])) + (f" and {len(same) - 10} more" if len(same) > 10 else "")
        raise ValueError(f"dataset {config.dataset!r}: {len(same)} rows have the same {config.response_field!r} "
                         f"and {config.rejected_field!r} answer (rows {shown}); a preference needs two different "
                         "answers: fix or remove them")


# What the in-training evaluation may cost, at most: a share of the training time between two evaluations. A
# training row costs about three forward passes (the forward and the backward; gradient checkpointing adds a fourth,
# left out to stay under the share), a held-out row one.
TRAINING_EVAL_SHARE = 0.1
FORWARDS_PER_TRAINING_ROW = 3


def training_eval_count(config, held_out: int) -> int:
    """How many held-out rows the trainer scores every eval_steps: training_eval_rows, or by default as many as cost
    TRAINING_EVAL_SHARE of the eval_steps training steps before each evaluation; never more than are held out."""
    if config.training_eval_rows is not None:
        return min(config.training_eval_rows, held_out)
    rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return min(held_out, math.ceil(TRAINING_EVAL_SHARE * config.eval_steps * rows_per_step * FORWARDS_PER_TRAINING_ROW))


def training_eval_indices(held: list[int], config) -> list[int]:
    """The fixed, seeded subset of the held-out row indices that the trainer scores every eval_steps."""
    return sorted(random.Random(config.seed).sample(held, training_eval_count(config, len(held))))


def hold_out(rows: list[dict[str, Any]], config,
             write: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows, the held-out rows scored while training): a seeded eval_fraction of the rows,
    never trained on, recorded in run_dir/split.json (when `write`: by the main process only) by position and by
    content, so that evaluation scores exactly those rows and notices when they changed, and the trainer the same
    subset of them each time."""
    from helpers.records import write_json

    count = round(len(rows) * config.eval_fraction)
    if config.eval_fraction > 0 and count == 0:
        count = 1
    held = sorted(random.Random(config.seed).sample(range(len(rows)), count))
    if count >= len(rows):
        raise ValueError(f"eval_fraction={config.eval_fraction} leaves no rows to train on ({len(rows)} rows)")
    in_training = training_eval_indices(held, config)
    train, held_rows, in_training_rows = _partition(rows, held, in_training)
    if write:
        write_json(Path(config.run_dir) / "split.json", {
            "dataset": config.dataset, "split": config.dataset_split, "revision": hub_revision(config.dataset),
            "rows": len(rows), "eval_fraction": config.eval_fraction, "seed": config.seed, "eval_indices": held,
            "training_eval_indices": in_training, **_contents(rows, held_rows)})
    return train, held_rows, in_training_rows


def reuse_split(rows: list[dict[str, Any]], config, source_run_dir: str | Path
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows, the held-out rows scored while training) as another run split them (its
    split.json, copied into run_dir), so that a run continuing that one never trains on the rows it held out, and both
    are scored on the same rows; held-out rows whose content changed since are refused, naming them. The subset
    scored while training is this run's own (its batch and eval_steps)."""
    from helpers.records import read_json, write_json

    path = Path(source_run_dir) / "split.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run in {str(source_run_dir)!r} recorded no held-out split")
    split = read_json(path)
    if split["dataset"] != config.dataset or split["rows"] != len(rows):
        raise ValueError(f"{path} split dataset {split['dataset']!r} of {split['rows']} rows, but this run has "
                         f"{config.dataset!r} with {len(rows)} rows: the held-out rows cannot be found again")
    in_training = training_eval_indices(split["eval_indices"], config)
    train, held, in_training_rows = _partition(rows, split["eval_indices"], in_training)
    revision = hub_revision(config.dataset)
    check_held_out(split, held, f"the run in {str(source_run_dir)!r}", revision,
                   "restore the dataset as it was, or set sft_run_dir='' to hold out rows of the dataset as it is")
    write_json(Path(config.run_dir) / "split.json", {**split, "training_eval_indices": in_training,
                                                     "from_run": str(source_run_dir), "revision": revision,
                                                     **_contents(rows, held)})
    return train, held, in_training_rows


def _partition(rows: list[dict[str, Any]], held: list[int], in_training: list[int]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows not held out, the held-out rows in the order of `held`, the rows of `in_training`)."""
    chosen = set(held)
    return ([r for i, r in enumerate(rows) if i not in chosen], [rows[i] for i in held],
            [rows[i] for i in in_training])


def held_out_rows(config) -> list[dict[str, Any]]:
    """The rows a run held out from training, as recorded in run_dir/split.json: loaded at the recorded revision
    of a Hub dataset, and checked to be the rows the run held out."""
    from helpers.records import read_json

    path = Path(config.run_dir) / "split.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run recorded no held-out split (eval_fraction=0?)")
    split = read_json(path)
    rows = load_rows(split["dataset"], split["split"], split.get("revision"))
    if len(rows) != split["rows"]:
        raise ValueError(f"dataset {split['dataset']!r} has {len(rows)} rows now but {split['rows']} when the run "
                         "was trained; the held-out rows cannot be found again")
    held = from_conversations([rows[i] for i in split["eval_indices"]], config, split["dataset"])
    check_held_out(split, held, f"run {str(config.run_dir)!r}", split.get("revision"),
                   "restore the dataset as it was, or train a new run on the dataset as it is")
    return held


# --- the held-out rows by content: a digest of every field of each (as training reads the row, conversations
# mapped), and of the whole dataset ------------------------------------------------------------------------------

class HeldOutRowsChanged(ValueError):
    """The rows at a split's held-out positions are no longer the rows the run held out."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def row_digests(row: dict[str, Any]) -> dict[str, str]:
    """A short digest of each field of a row, to recognise it later and name the field that changed."""
    return {key: _digest(value)[:16] for key, value in row.items()}


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """One digest of all rows, in order: equal only for the same rows."""
    return _digest([_digest(row) for row in rows])


def _contents(rows: list[dict[str, Any]], held: list[dict[str, Any]]) -> dict[str, Any]:
    """split.json's record of content: the whole dataset's digest and each held-out row's field digests."""
    return {"dataset_sha256": rows_digest(rows), "eval_row_digests": [row_digests(row) for row in held]}


def check_held_out(split: dict[str, Any], held: list[dict[str, Any]], recorder: str, revision: str | None,
                   remedy: str) -> None:
    """Raise HeldOutRowsChanged naming each held-out row (and its fields) that is not what `recorder` held out;
    a split recorded before contents were is passed with a warning."""
    recorded = split.get("eval_row_digests")
    if recorded is None:
        log.warning("%s recorded its held-out rows by position only; their content is not checked", recorder)
        return
    changed = []
    for index, before, row in zip(split["eval_indices"], recorded, held):
        now = row_digests(row)
        fields = [name for name in dict.fromkeys([*before, *now]) if before.get(name) != now.get(name)]
        if fields:
            changed.append(f"row {index + 1} (index {index}): {', '.join(map(repr, fields))}")
    if not changed:
        return
    shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more rows" if len(changed) > 5 else "")
    then = split.get("revision")
    moved = f" (the Hub dataset was at revision {then}, now {revision})" if then and revision and then != revision else ""
    raise HeldOutRowsChanged(f"dataset {split['dataset']!r} changed since {recorder} held its rows out{moved}: "
                             f"{len(changed)} of {len(held)} held-out rows differ ({shown}); {remedy}")


def to_training_set(rows: list[dict[str, Any]], config, tokenizer):
    """The rows as a datasets.Dataset of `prompt` and `completion` texts in the configured template: the
    prompt as the model sees it at inference, the completion the response and one EOS. The loss covers both,
    or only the completion with train_on_responses_only.

    Rows longer than max_seq_length tokens are counted and, by `long_rows`, kept to be truncated or dropped.
    """
    return training_set(rows, config, tokenizer)[0]


def training_set(rows: list[dict[str, Any]], config, tokenizer):
    """(to_training_set's dataset, the tokens of its longest row as training sees it), the rows tokenized once: at
    most max_seq_length; with packing, rows are joined into sequences of max_seq_length."""
    from datasets import Dataset

    prompts, (completions,) = _formatted(rows, config, tokenizer, (config.response_field,))
    keep, lengths = _within_length(prompts, [completions], config, tokenizer)
    dataset = Dataset.from_dict({"prompt": [prompts[i] for i in keep], "completion": [completions[i] for i in keep]})
    longest = config.max_seq_length if config.packing else min(max(lengths[i] for i in keep), config.max_seq_length)
    return dataset, longest


def to_preference_set(rows: list[dict[str, Any]], config, tokenizer):
    """The rows as a datasets.Dataset of `prompt`, `chosen` and `rejected` texts for trl's DPOTrainer: the prompt
    exactly as in SFT and at inference, each answer followed by one EOS. A row is long when prompt and its longer
    answer pass max_seq_length; `long_rows` says whether it is truncated or dropped."""
    from datasets import Dataset

    prompts, (chosen, rejected) = _formatted(rows, config, tokenizer, (config.response_field, config.rejected_field))
    keep, _ = _within_length(prompts, [chosen, rejected], config, tokenizer)
    return Dataset.from_dict({"prompt": [prompts[i] for i in keep], "chosen": [chosen[i] for i in keep],
                              "rejected": [rejected[i] for i in keep]})


def _formatted(rows, config, tokenizer, answer_fields) -> tuple[list[str], list[list[str]]]:
    """The generation prompts and, for each answer field, the answers each ending in one EOS."""
    prompts = [format_generation_prompt(config.prompt_template, row[config.prompt_field], tokenizer,
                                        config.system_prompt) for row in rows]
    return prompts, [[with_one_eos(row[field], tokenizer.eos_token) for row in rows] for field in answer_fields]


def _within_length(prompts: list[str], answers: list[list[str]], config,
                   tokenizer) -> tuple[list[int], list[int]]:
    """(indices of the rows to keep, every row's tokens): all rows kept (long ones get truncated) or, with
    long_rows='drop', the short ones. A row's length is that of its prompt with its longest answer."""
    lengths = [0] * len(prompts)
    for column in answers:
        full = [p + a for p, a in zip(prompts, column)]
        lengths = [max(n, len(ids)) for n, ids in zip(lengths, tokenizer(full, add_special_tokens=True)["input_ids"])]
    long = {i for i, n in enumerate(lengths) if n > config.max_seq_length}
    if long:
        action = "dropped" if config.long_rows == "drop" else "truncated to max_seq_length"
        log.warning("%d of %d rows are longer than max_seq_length=%d tokens (longest %d); they are %s "
                    "(long_rows=%r)", len(long), len(prompts), config.max_seq_length, max(lengths), action,
                    config.long_rows)
    keep = [i for i in range(len(prompts)) if config.long_rows != "drop" or i not in long]
    if not keep:
        raise ValueError(f"no rows left after dropping {len(long)} rows longer than max_seq_length="
                         f"{config.max_seq_length}; raise max_seq_length or set long_rows='truncate'")
    return keep, lengths
