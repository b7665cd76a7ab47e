"""Preference tuning: its configuration, input guards, data and the reference model the trainer really uses."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from helpers import data, preference
from helpers.config import DPO_DEFAULTS, RunConfig, preference_config
from helpers.paths import PROFILES
from helpers.records import training_log, update_run_record

TINY_DPO = yaml.safe_load((PROFILES / "cpu_tiny_dpo.yaml").read_text())


def sft_run(tmp_path, status="finished", **params):
    """A recorded SFT run (run.json, split.json, an adapter folder) without training anything."""
    run_dir = tmp_path / "sft"
    (run_dir / "adapter").mkdir(parents=True)
    update_run_record(run_dir, status=status, parameters=RunConfig.from_dict({**params, "run_dir": str(run_dir)})
                      .to_dict())
    return run_dir


# --- configuration --------------------------------------------------------------------------------------------

def test_dpo_defaults_are_valid_and_differ_where_dpo_needs_it():
    config = RunConfig.from_dict(DPO_DEFAULTS)
    assert config.learning_rate < RunConfig().learning_rate and config.run_dir != RunConfig().run_dir


def test_settings_left_at_their_defaults_are_inherited_from_the_sft_run(tmp_path):
    run = sft_run(tmp_path, model_name="some/model", lora_r=8, prompt_template="chat", system_prompt="Be kind.")
    config = preference_config({"sft_run_dir": str(run), "run_dir": str(tmp_path / "dpo"), "beta": 0.2})
    assert (config.model_name, config.lora_r, config.prompt_template, config.system_prompt) == \
        ("some/model", 8, "chat", "Be kind.")
    assert config.beta == 0.2 and config.run_dir == str(tmp_path / "dpo")


def test_dpo_into_the_sft_run_dir_is_refused_before_anything_is_touched(tmp_path):
    run = sft_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for run_dir in (str(run), str(run) + "/", str(tmp_path / "." / run.name)):
        with pytest.raises(ValueError, match=r"is the sft_run_dir: DPO would write over the SFT run"):
            preference_config({"sft_run_dir": str(run), "run_dir": run_dir, "overwrite": True})
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_setting_that_contradicts_the_sft_run_is_an_error(tmp_path):
    run = sft_run(tmp_path, lora_r=8)
    with pytest.raises(ValueError, match=r"lora_r 16 here, 8 in the SFT run"):
        preference_config({"sft_run_dir": str(run), "lora_r": 16})
    assert preference_config({"sft_run_dir": str(run), "lora_r": 8}).lora_r == 8  # agreeing is fine


@pytest.mark.parametrize("status", ["running", "failed"])
def test_an_unfinished_sft_run_is_refused(tmp_path, status):
    with pytest.raises(ValueError, match=f"unfinished run \\(status '{status}'\\)"):
        preference_config({"sft_run_dir": str(sft_run(tmp_path, status=status))})


def test_a_missing_sft_run_is_refused_naming_the_way_out(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no training run .*sft_run_dir=''"):
        preference_config({"sft_run_dir": str(tmp_path / "nothing")})


@pytest.mark.parametrize("params, message", [
    ({"loss_type": "kto"}, r"loss_type 'kto' is unknown; choose one of: sigmoid, ipo, hinge"),
    ({"beta": 0.0}, r"beta = 0.0 is invalid; it must be a positive number"),
    ({"reference": "sft"}, r"'base' when no sft_run_dir is given"),
    ({"reference": "policy"}, r"reference 'policy' is unknown; choose one of: base, sft"),
    ({"rejected_field": ""}, r"rejected_field = '' is invalid for preference tuning"),
])
def test_bad_preference_values_are_refused_with_the_accepted_ones(params, message):
    with pytest.raises(ValueError, match=message):
        preference_config({"sft_run_dir": "", **params})


# --- data -----------------------------------------------------------------------------------------------------

def write_rows(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_missing_rejected_column_is_an_error_listing_the_columns(tmp_path):
    config = RunConfig(dataset=write_rows(tmp_path, [{"prompt": "q", "chosen": "a"}]))
    assert data.load_checked_rows(config)  # SFT does not need it
    with pytest.raises(ValueError, match=r"rejected_field 'rejected' is not a column .*columns found: prompt, chosen"):
        data.load_checked_rows(config, preference=True)


def test_empty_rejected_answer_is_an_error_naming_the_row(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "  "}]
    with pytest.raises(ValueError, match=r"row 2: column 'rejected' is empty"):
        data.load_checked_rows(RunConfig(dataset=write_rows(tmp_path, rows)), preference=True)


def test_identical_answers_are_an_error_naming_the_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "same ", "rejected": "same" if i % 2 else "other"} for i in range(4)]
    with pytest.raises(ValueError, match=r"2 rows have the same 'chosen' and 'rejected' answer \(rows 2, 4\)"):
        data.load_checked_rows(RunConfig(dataset=write_rows(tmp_path, rows)), preference=True)


def test_preference_set_has_the_sft_prompt_and_each_answer_with_one_eos(tiny_tokenizer):
    config = RunConfig.from_dict(TINY_DPO)
    rows = [{"prompt": "Hi?", "chosen": "Hey there!", "rejected": "Greetings." + tiny_tokenizer.eos_token}]
    (pair,) = data.to_preference_set(rows, config, tiny_tokenizer)
    sft = data.to_training_set(rows, config, tiny_tokenizer)[0]
    assert pair["prompt"] == sft["prompt"] and pair["chosen"] == sft["completion"] == "Hey there!" + tiny_tokenizer.eos_token
    assert pair["rejected"] == "Greetings." + tiny_tokenizer.eos_token  # one EOS, not two


def test_long_pairs_are_dropped_by_their_longer_answer(tiny_tokenizer):
    config = RunConfig.from_dict({**TINY_DPO, "max_seq_length": 40, "long_rows": "drop"})
    rows = [{"prompt": "Hi?", "chosen": "ok", "rejected": "no " * 50}, {"prompt": "Hi?", "chosen": "ok", "rejected": "no"}]
    assert [p["rejected"] for p in data.to_preference_set(rows, config, tiny_tokenizer)] == ["no" + tiny_tokenizer.eos_token]


def test_a_continuing_run_reuses_the_held_out_split(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    first = RunConfig(dataset="d.jsonl", eval_fraction=0.2, run_dir=str(tmp_path / "sft"))
    _, held, _ = data.hold_out(rows, first)
    second = RunConfig(dataset="d.jsonl", eval_fraction=0.5, seed=1, run_dir=str(tmp_path / "dpo"))
    train, again, _ = data.reuse_split(rows, second, first.run_dir)
    assert again == held and len(train) == 8 and not set(map(str, train)) & set(map(str, held))
    assert json.loads((tmp_path / "dpo/split.json").read_text())["from_run"] == first.run_dir
    with pytest.raises(ValueError, match="held-out rows cannot be found again"):
        data.reuse_split(rows[:9], second, first.run_dir)


def test_dpo_stops_when_a_row_the_sft_run_held_out_was_edited_in_place(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(10)]
    first = RunConfig(dataset="d.jsonl", eval_fraction=0.2, run_dir=str(tmp_path / "sft"))
    data.hold_out(rows, first)
    index = json.loads((tmp_path / "sft/split.json").read_text())["eval_indices"][0]
    edited = [dict(row) for row in rows]
    edited[index]["prompt"] = edited[index]["chosen"] = "edited"  # DPO would train on a held-out row's new text
    second = RunConfig(dataset="d.jsonl", run_dir=str(tmp_path / "dpo"))
    with pytest.raises(ValueError, match=rf"1 of 2 held-out rows differ \(row {index + 1} \(index "
                                         rf"{index}\): 'prompt', 'chosen'\); restore the dataset"):
        data.reuse_split(edited, second, first.run_dir)
    assert not (tmp_path / "dpo/split.json").exists()


def test_the_training_log_keeps_reward_columns_only_when_logged():
    sft = training_log([{"step": 1, "loss": 2.0}])
    dpo = training_log([{"step": 1, "loss": 0.7, "rewards/accuracies": 0.5, "rewards/margins": 0.1},
                        {"step": 1, "eval_loss": 0.6, "eval_rewards/accuracies": 1.0}])
    assert "rewards/accuracies" not in sft[0]
    assert dpo == [{"step": 1, "loss": 0.7, "learning_rate": None, "grad_norm": None, "epoch": None, "eval_loss": 0.6,
                    "rewards/accuracies": 0.5, "rewards/margins": 0.1, "eval_rewards/accuracies": 1.0}]


# --- the reference model --------------------------------------------------------------------------------------

def first_step(sft_run_dir, tmp_path, reference):
    """Build the DPO trainer on the SFT run's adapter (a fresh one without) and train one step; (trainer,
    parameter counts before and after the trainer was built, the step's log)."""
    params = {**TINY_DPO, "sft_run_dir": str(sft_run_dir), "run_dir": str(tmp_path / reference),
              "reference": reference, "max_steps": 1, "gradient_accumulation_steps": 1, "warmup_steps": 0}
    config = preference_config(params)
    rows = data.load_checked_rows(config, preference=True)[:4]
    model, tokenizer = preference.load_policy(config, "fp32")
    before = sum(p.numel() for p in model.parameters())
    trainer = preference.build_trainer(model, tokenizer, data.to_preference_set(rows, config, tokenizer), config, "fp32")
    after = sum(p.numel() for p in model.parameters())
    trainer.train()
    return trainer, before, after, trainer.state.log_history[0]


@pytest.mark.notebook
def test_the_default_reference_is_the_base_model_with_the_adapter_disabled(tiny_run, tmp_path):
    trainer, before, after, step = first_step(tiny_run, tmp_path, "base")
    assert preference.reference_in_use(trainer) == "the base model, adapter disabled"
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"] and after == before
    # The policy starts as the SFT model, the reference is the base: the first rewards are already non-zero.
    assert abs(step["rewards/chosen"]) > 1e-3 and step["loss"] != pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.notebook
def test_the_sft_reference_is_a_frozen_copy_of_the_adapter_only(tiny_run, tmp_path):
    trainer, before, after, step = first_step(tiny_run, tmp_path, "sft")
    assert preference.reference_in_use(trainer) == "a frozen copy of the starting adapter"
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if ".default." in n)
    assert after == before + lora  # one more adapter, no second copy of the base weights
    # Policy and reference are the same model at the first step: rewards 0 and the loss is exactly log 2.
    assert step["rewards/chosen"] == pytest.approx(0, abs=1e-6) and step["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.notebook
def test_without_an_sft_run_a_fresh_adapter_starts_equal_to_its_reference(tiny_run, tmp_path):
    trainer, before, after, step = first_step("", tmp_path, "base")  # tiny_run: the tiny model is built
    assert preference.reference_in_use(trainer) == "the base model, adapter disabled" and after == before
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)  # only the fresh adapter trains
    # LoRA's B starts at zero: policy and base are the same model at the first step, so the loss is log 2.
    assert step["rewards/chosen"] == pytest.approx(0, abs=1e-6) and step["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_an_sft_run_on_drive_is_mounted_before_it_is_read(tmp_path, monkeypatch):
    import helpers.config

    mounted = []
    monkeypatch.setattr(helpers.config, "mount_drive_if_needed", mounted.append)
    with pytest.raises(FileNotFoundError):
        preference_config({"sft_run_dir": "/content/drive/MyDrive/lora-run"})
    with pytest.raises(FileNotFoundError):
        helpers.config.run_config({"run_dir": "/content/drive/MyDrive/dpo-run"})
    assert mounted == ["/content/drive/MyDrive/lora-run", "/content/drive/MyDrive/dpo-run"]
