"""Loading and checking training rows from local files, and rendering them as training text."""
from __future__ import annotations

import csv
import json

import pytest

from helpers.config import RunConfig
from helpers.data import (
    hold_out,
    reuse_split,
    training_eval_count,
    LOCAL_FORMATS,
    SAMPLE_DATASET,
    check_rows,
    is_local_path,
    load_checked_rows,
    load_rows,
    read_local_rows,
    to_training_set,
    training_set,
)
from helpers.prompts import format_alpaca_prompt

ROWS = [
    {"prompt": "What's up?", "chosen": "Not much, you?", "rejected": "I am an AI."},
    {"prompt": "Favorite color?", "chosen": "Blue, like the sea!", "rejected": "I have no preferences."},
    {"prompt": "Tea or coffee?", "chosen": "Coffee, always ☕", "rejected": "Both are beverages."},
]
QA_ROWS = [{"question": r["prompt"], "answer": r["chosen"]} for r in ROWS]
EOS = "<|end_of_text|>"


def write_rows(path, rows, fmt=None):
    """Write rows to path in the format its extension (or fmt) names."""
    fmt = fmt or path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "json-data":
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif fmt == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(fmt)
    return path


# ---------------------------------------------------------------- local formats


@pytest.mark.parametrize("name, fmt", [
    ("rows.jsonl", None),
    ("rows.json", None),
    ("rows.json", "json-data"),
    ("rows.csv", None),
    ("rows.parquet", None),
    ("ROWS.JSONL", ".jsonl"),
])
def test_every_local_format_reads_the_same_rows(tmp_path, name, fmt):
    path = write_rows(tmp_path / name, ROWS, fmt)
    assert read_local_rows(path) == ROWS
    assert read_local_rows(str(path)) == ROWS
    assert load_rows(str(path)) == ROWS


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert read_local_rows(path) == ROWS[:2]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_checked_rows_maps_custom_columns(tmp_path, suffix):
    path = write_rows(tmp_path / f"qa{suffix}", QA_ROWS)
    config = RunConfig(dataset=str(path), prompt_field="question", response_field="answer")
    assert load_checked_rows(config) == QA_ROWS


def test_load_checked_rows_reports_a_missing_custom_column(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", QA_ROWS)
    config = RunConfig(dataset=str(path))  # default fields prompt/chosen are not there
    with pytest.raises(ValueError, match=r"prompt_field 'prompt' is not a column.*columns found: question, answer"):
        load_checked_rows(config)


# ---------------------------------------------------------------- file errors


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl.*does not exist"):
        read_local_rows(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_checked_rows(RunConfig(dataset=str(path)))


def test_unsupported_extension_lists_accepted_formats(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"rows\.txt.*'\.txt'.*accepted formats") as info:
        read_local_rows(path)
    for fmt in LOCAL_FORMATS:
        assert fmt in str(info.value)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"prompt\": oops}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl: line 3 is not valid JSON"):
        read_local_rows(path)


def test_jsonl_row_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2 is a list, not an object"):
        read_local_rows(path)


@pytest.mark.parametrize("content, kind", [
    ({"prompt": "a", "chosen": "b"}, "dict"),
    ("just text", "str"),
    ({"data": {"prompt": "a"}}, "dict"),
    (42, "int"),
])
def test_json_that_is_not_a_list_is_an_error(tmp_path, content, kind):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"expected a list of objects.*got {kind}"):
        read_local_rows(path)


def test_json_list_of_non_objects_is_an_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([ROWS[0], "text"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2 is a str"):
        read_local_rows(path)


# ---------------------------------------------------------------- row checks

FIELDS = {"prompt_field": "prompt", "response_field": "chosen"}


def test_check_rows_accepts_good_rows():
    check_rows(ROWS, FIELDS, "mine")  # no exception


def test_missing_column_names_it_and_lists_columns_found():
    with pytest.raises(ValueError, match=r"response_field 'answer' is not a column of 'mine'; "
                                         r"columns found: prompt, chosen, rejected"):
        check_rows(ROWS, {"prompt_field": "prompt", "response_field": "answer"}, "mine")


@pytest.mark.parametrize("rows", [[]])
def test_empty_dataset_is_an_error(rows):
    with pytest.raises(ValueError, match=r"'mine' is empty"):
        check_rows(rows, FIELDS, "mine")


def test_empty_jsonl_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty"):
        load_checked_rows(RunConfig(dataset=str(path)))


@pytest.mark.parametrize("value, kind", [(5, "int"), (None, "NoneType"), (["a"], "list")])
def test_non_string_value_names_row_and_column(value, kind):
    rows = [dict(r) for r in ROWS]
    rows[1]["chosen"] = value
    with pytest.raises(ValueError, match=rf"'mine' row 2: column 'chosen' holds {kind}.*not text"):
        check_rows(rows, FIELDS, "mine")


def test_column_missing_from_a_later_row_names_row_and_column():
    rows = [dict(r) for r in ROWS]
    del rows[2]["prompt"]
    with pytest.raises(ValueError, match=r"row 3: column 'prompt' holds NoneType"):
        check_rows(rows, FIELDS, "mine")


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_field_names_row_and_column(value):
    rows = [dict(r) for r in ROWS]
    rows[2]["prompt"] = value
    with pytest.raises(ValueError, match=r"'mine' row 3: column 'prompt' is empty"):
        check_rows(rows, FIELDS, "mine")


def test_empty_csv_cell_is_caught(tmp_path):
    rows = [dict(r) for r in QA_ROWS]
    rows[1]["answer"] = ""
    path = write_rows(tmp_path / "qa.csv", rows)
    config = RunConfig(dataset=str(path), prompt_field="question", response_field="answer")
    with pytest.raises(ValueError, match=r"row 2: column 'answer' is empty"):
        load_checked_rows(config)


# ---------------------------------------------------------------- local vs Hub


@pytest.mark.parametrize("name, local", [
    ("HumanLLMs/Human-Like-DPO-Dataset", False),
    ("unsloth/Qwen2.5-0.5B-Instruct", False),
    ("gpt2", False),
    ("x.jsonl", True),
    ("data/x.parquet", True),
    ("x.CSV", True),
    ("x.json", True),
    ("outputs/_models/tiny-llama", True),
    ("outputs/lora-run", True),
    ("/models/llama", True),
    ("./model", True),
    ("../model", True),
    ("~/model", True),
    ("runs/sft/export/lora", True),
])
def test_one_rule_tells_a_local_path_from_a_hub_id(name, local):
    assert is_local_path(name) is local


def test_a_folder_named_like_a_hub_id_does_not_redirect_it_and_is_named_once(tmp_path, caplog):
    (tmp_path / "HumanLLMs/Human-Like-DPO-Dataset").mkdir(parents=True)  # a stray folder of the Hub id's name
    (tmp_path / "rows").write_text("x")
    with caplog.at_level("WARNING", logger="helpers.data"):
        for _ in range(3):
            assert is_local_path("HumanLLMs/Human-Like-DPO-Dataset", root=tmp_path) is False
            assert is_local_path("rows", root=tmp_path) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"'HumanLLMs/Human-Like-DPO-Dataset' is read as a Hugging Face Hub id, not as the local folder of that name "
        f"({tmp_path}/HumanLLMs/Human-Like-DPO-Dataset); write './HumanLLMs/Human-Like-DPO-Dataset' to use the "
        "local one",
        f"'rows' is read as a Hugging Face Hub id, not as the local file of that name ({tmp_path}/rows); write "
        "'./rows' to use the local one"]
    assert is_local_path(str(tmp_path / "rows")) is True and is_local_path("./rows") is True


# ---------------------------------------------------------------- bundled sample


def test_bundled_sample_is_a_valid_dpo_dataset():
    assert SAMPLE_DATASET.is_file()
    rows = read_local_rows(SAMPLE_DATASET)
    check_rows(rows, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}, str(SAMPLE_DATASET))
    assert len(rows) >= 200
    assert all(row["chosen"] != row["rejected"] for row in rows)


def test_default_config_pointed_at_the_sample_loads():
    rows = load_checked_rows(RunConfig(dataset=str(SAMPLE_DATASET)))
    assert len(rows) >= 200


# ---------------------------------------------------------------- training set


def test_to_training_set_gives_one_alpaca_text_per_row(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    dataset = to_training_set(ROWS, RunConfig(dataset="x.jsonl"), tiny_tokenizer)
    assert dataset.column_names == ["prompt", "completion"]
    assert len(dataset) == len(ROWS)
    for row, prompt, completion in zip(ROWS, dataset["prompt"], dataset["completion"]):
        text = prompt + completion
        assert prompt == format_alpaca_prompt(row["prompt"]) and completion == row["chosen"] + eos
        assert text == format_alpaca_prompt(row["prompt"], row["chosen"], eos)
        assert text.endswith(row["chosen"] + eos)
        assert text.count(eos) == 1


def test_to_training_set_uses_configured_fields(tiny_tokenizer):
    config = RunConfig(dataset="x.jsonl", prompt_field="question", response_field="answer")
    dataset = to_training_set(QA_ROWS, config, tiny_tokenizer)
    texts = [p + c for p, c in zip(dataset["prompt"], dataset["completion"])]
    assert texts[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat's up?\n\n### Response:\nNot much, you?" + tiny_tokenizer.eos_token
    )


def test_long_rows_are_counted_and_truncated_or_dropped(tiny_tokenizer, caplog):
    rows = [{"prompt": "Hi?", "chosen": "Hello! " * n} for n in (1, 200, 300)]
    with caplog.at_level("WARNING"):
        kept = to_training_set(rows, RunConfig(dataset="x.jsonl", max_seq_length=120), tiny_tokenizer)
    assert len(kept) == 3 and "2 of 3 rows are longer than max_seq_length=120" in caplog.text
    dropped = to_training_set(rows, RunConfig(dataset="x.jsonl", max_seq_length=120, long_rows="drop"), tiny_tokenizer)
    assert dropped["completion"] == kept["completion"][:1]


def test_longest_row_is_the_packed_sequence_when_packing(tiny_tokenizer):
    # micro_batching="auto" sizes micro-batches by it: packed rows are max_seq_length long, not the longest text
    rows = [{"prompt": "Hi?", "chosen": "Hello! " * n} for n in (1, 20)]
    plain = RunConfig(dataset="x.jsonl", max_seq_length=512)
    packed = RunConfig(dataset="x.jsonl", max_seq_length=512, packing=True)
    text = format_alpaca_prompt(rows[1]["prompt"], rows[1]["chosen"], tiny_tokenizer.eos_token)
    longest = len(tiny_tokenizer(text, add_special_tokens=True)["input_ids"])
    assert training_set(rows, plain, tiny_tokenizer)[1] == longest < 512
    assert training_set(rows, packed, tiny_tokenizer)[1] == 512


def test_dataset_empty_after_dropping_long_rows_is_an_error(tiny_tokenizer):
    rows = [{"prompt": "Hi?", "chosen": "Hello! " * 300}]
    with pytest.raises(ValueError, match=r"no rows left after dropping 1 rows longer than max_seq_length=64"):
        to_training_set(rows, RunConfig(dataset="x.jsonl", max_seq_length=64, long_rows="drop"), tiny_tokenizer)


def test_csv_with_a_byte_order_mark_keeps_its_column_names(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("prompt,chosen\nHi?,Hello!\n", encoding="utf-8-sig")
    assert read_local_rows(path) == [{"prompt": "Hi?", "chosen": "Hello!"}]


def test_malformed_json_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON at line \d"):
        read_local_rows(path)


def test_the_rows_scored_while_training_are_the_same_held_out_rows_each_time(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}"} for i in range(1000)]
    config = RunConfig(dataset="d.jsonl", eval_fraction=0.1, eval_steps=20, run_dir=str(tmp_path / "a"))
    train, held, in_training = hold_out(rows, config)
    again = hold_out(rows, RunConfig(dataset="d.jsonl", eval_fraction=0.1, eval_steps=20, run_dir=str(tmp_path / "b")))
    # a tenth of the training between two evaluations: 0.1 x 20 steps x 8 rows x 3 forward passes a row
    assert len(held) == 100 and len(in_training) == 48 == training_eval_count(config, len(held))
    assert again[2] == in_training and again[1] == held  # seeded: the same rows every time
    assert {r["prompt"] for r in in_training} < {r["prompt"] for r in held}  # only held-out rows...
    assert not {r["prompt"] for r in in_training} & {r["prompt"] for r in train}  # ...never a training row
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    assert [rows[i] for i in split["training_eval_indices"]] == in_training  # recorded, to be found again


@pytest.mark.parametrize("setting, expected", [(None, 12), (5, 5), (0, 0), (500, 30)])
def test_the_rows_scored_while_training_follow_the_setting_and_never_exceed_the_held_out(setting, expected):
    config = RunConfig(dataset="d.jsonl", eval_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                       training_eval_rows=setting)
    assert training_eval_count(config, 30) == expected  # None: ceil(0.1 x 5 x 8 x 3)


def test_a_continuing_run_scores_its_own_subset_of_the_same_held_out_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(200)]
    _, held, _ = hold_out(rows, RunConfig(dataset="d.jsonl", eval_fraction=0.2, run_dir=str(tmp_path / "sft")))
    dpo = RunConfig(dataset="d.jsonl", eval_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    run_dir=str(tmp_path / "dpo"))
    _, again, in_training = reuse_split(rows, dpo, tmp_path / "sft")
    assert again == held and len(in_training) == 3 and all(row in held for row in in_training)


# ---------------------------------------------------------------- the held-out rows, by content


def _split_run(tmp_path, rows):
    """A run that held out 20% of rows from a local file (split.json written as training writes it)."""
    path = write_rows(tmp_path / "rows.jsonl", rows)
    config = RunConfig(dataset=str(path), eval_fraction=0.2, run_dir=str(tmp_path / "run"))
    _, held, _ = hold_out(rows, config)
    return config, held


MANY = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(10)]


def test_evaluation_scores_the_held_out_rows_and_stops_when_one_was_edited_in_place(tmp_path):
    from helpers.data import held_out_rows
    from helpers.records import read_json

    config, held = _split_run(tmp_path, MANY)
    assert held_out_rows(config) == held  # what 03_evaluate scores
    index = read_json(tmp_path / "run/split.json")["eval_indices"][1]
    edited = [dict(row) for row in MANY]
    edited[index]["rejected"] = "no, edited in place"  # same length, same position: only the content tells
    write_rows(tmp_path / "rows.jsonl", edited)
    with pytest.raises(ValueError) as stop:  # data.HeldOutRowsChanged
        held_out_rows(config)
    assert (f"changed since run '{tmp_path / 'run'}' held its rows out: 1 of 2 held-out rows differ "
            f"(row {index + 1} (index {index}): 'rejected')") in str(stop.value)


def test_a_split_records_the_hub_revision_and_evaluation_loads_that_one(tmp_path, monkeypatch):
    import helpers.data

    from helpers.records import read_json

    monkeypatch.setattr(helpers.data, "hub_revision", lambda dataset: "0123abcd")
    config = RunConfig(dataset="someone/pairs", run_dir=str(tmp_path / "run"), eval_fraction=0.2)
    _, held, _ = helpers.data.hold_out(MANY, config)
    assert read_json(tmp_path / "run/split.json")["revision"] == "0123abcd"
    loaded = []

    class Loaded:
        @staticmethod
        def to_list():
            return MANY

    def load_dataset(name, split, revision=None):
        loaded.append((name, split, revision))
        return Loaded

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    assert helpers.data.held_out_rows(config) == held
    assert loaded == [("someone/pairs", "train", "0123abcd")]


def test_the_hub_revision_is_the_datasets_commit_or_none_offline(monkeypatch):
    import huggingface_hub

    from helpers.data import hub_revision

    info = type("DatasetInfo", (), {"sha": "f00dfeed"})
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name: info)
    assert hub_revision("someone/pairs") == "f00dfeed" and hub_revision("rows.jsonl") is None

    def offline(self, name):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    assert hub_revision("someone/pairs") is None
