"""GGUF made offline by llama.cpp's Python converter: the tiny model through export_all (fast), and SmolLM2, a real
pretrained model with a byte-level BPE tokenizer read from a GGUF file, after a short SFT run (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.config import RunConfig
from helpers.records import read_json


class MergingModel:
    """Stands in for unsloth's model in export_all: saves itself as the merged 16-bit checkpoint."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def save_pretrained_merged(self, folder, tokenizer, save_method, maximum_memory_usage):
        import torch

        assert save_method == "merged_16bit"
        self.model.to(torch.bfloat16).save_pretrained(folder)
        self.model.float()
        tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_gguf_export(tmp_path_factory):
    """The tiny random Llama exported as q8_0 GGUF by export_all, with a record of a run around it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.export import export_all
    from helpers.local_models import build_random_llama

    root = tmp_path_factory.mktemp("gguf")
    source = build_random_llama(root / "tiny", "tiny")
    run = root / "run"
    run.mkdir()
    config = RunConfig(model_name=str(source), run_dir=str(run), formats=["gguf"], precision="fp32",
                       load_in_4bit=False, dataset="helpers/data/sample_dpo.jsonl")
    (run / "run.json").write_text(json.dumps({"parameters": config.to_dict(), "metrics": {}}))
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    return export_all(MergingModel(model), AutoTokenizer.from_pretrained(source), config, "fp32"), run


def test_the_default_gguf_is_made_offline_and_reloads_with_the_same_tokens(tiny_gguf_export):
    manifest, run = tiny_gguf_export
    entry = manifest["formats"]["gguf"]
    assert entry["status"] == "ok" and entry["quantization"] == "q8_0" == RunConfig().gguf_quantization, entry
    names = [f["name"] for f in entry["files"]]
    assert names == ["Modelfile", "README.md", "run.Q8_0.gguf"], names  # the merged checkpoint is not kept
    gguf_bytes = next(f["bytes"] for f in entry["files"] if f["name"].endswith(".gguf"))
    assert 0.5e6 < gguf_bytes < 2.5e6  # 0.63M parameters: about a byte each in q8_0, not 4 (f32)
    reload = entry["reload"]
    assert reload["loaded"] is True and reload["token_agreement"] >= 0.9, reload
    # the check prompt, the fixed text of digits and scripts, and no held-out rows (this run has no split.json)
    assert reload["tokenizer_round_trip"] == {"exact": True, "texts": 2, "differing_texts": 0}
    assert read_json(run / "export/manifest.json") == manifest


def test_the_gguf_file_names_the_tokenizer_llama_cpp_needs(tiny_gguf_export):
    from gguf import GGUFReader

    _, run = tiny_gguf_export
    fields = GGUFReader(str(run / "export/gguf/run.Q8_0.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"  # byte-level BPE, with its merges
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # not in the converter's table: named by us
    assert len(fields["tokenizer.ggml.merges"].contents()) > 500
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 1  # <|end_of_text|>


def test_the_modelfile_and_card_say_how_to_run_it_in_the_trained_template(tiny_gguf_export):
    _, run = tiny_gguf_export
    modelfile = (run / "export/gguf/Modelfile").read_text()
    assert modelfile.startswith("FROM ./run.Q8_0.gguf\n")
    assert ('TEMPLATE """Below is an instruction that describes a task. Write a response that appropriately '
            'completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}'
            '<|end_of_text|>"""') in modelfile
    assert 'PARAMETER stop "<|end_of_text|>"' in modelfile
    card = (run / "export/gguf/README.md").read_text()
    assert "llama-cli -m run.Q8_0.gguf -n 256 -no-cnv -p" in card and "ollama create" in card


def test_a_chat_run_gets_its_chat_template_in_the_modelfile(tiny_tokenizer):
    from helpers.gguf import ollama_modelfile

    config = RunConfig(prompt_template="chat", system_prompt="Be brief.")
    modelfile = ollama_modelfile("m.Q8_0.gguf", config, tiny_tokenizer)
    # exactly the text training saw: this tokenizer does not add BOS itself, so the template carries it
    assert ('TEMPLATE """<|begin_of_text|>Be brief.<｜User｜>{{ .Prompt }}<｜Assistant｜><think>\n\n</think>\n\n{{ .Response }}'
            '<|end_of_text|>"""') in modelfile


def test_k_quants_are_not_offered_to_the_converter(tmp_path):
    from helpers.gguf import convert

    with pytest.raises(ValueError, match="q4_k_m.*needs llama.cpp.*f16, bf16, q8_0"):
        convert(tmp_path, tmp_path / "x.gguf", "q4_k_m")


@pytest.mark.notebook
@pytest.mark.real_model
def test_smollm2_after_sft_exports_to_a_gguf_that_answers_like_the_tuned_model(tmp_path):
    from helpers.paths import PROJECT_ROOT
    from helpers.export import export_all
    from helpers.local_models import SMOLLM2_MODEL_DIR, build_smollm2
    from helpers.modeling import load_trained_model
    from helpers.train import train

    model_dir = build_smollm2(PROJECT_ROOT / SMOLLM2_MODEL_DIR)  # prepared once, as 00_setup does
    config = RunConfig(model_name=str(model_dir), run_dir=str(tmp_path / "run"), max_seq_length=256,
                       load_in_4bit=False, precision="fp32", dataset="helpers/data/sample_dpo.jsonl",
                       prompt_template="chat", train_on_responses_only=True, lora_r=8, lora_alpha=16,
                       learning_rate=5e-4, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                       warmup_steps=0, eval_fraction=0.02, eval_steps=100, save_steps=100, optim="adamw_torch",
                       formats=["gguf"])
    train(config)
    model, tokenizer = load_trained_model(config, "fp32", Path(config.run_dir) / "adapter")
    entry = export_all(model, tokenizer, config, "fp32")["formats"]["gguf"]
    assert entry["status"] == "ok" and entry["quantization"] == "q8_0", entry
    reload = entry["reload"]
    assert reload["loaded"] is True and reload["token_agreement"] >= 0.9, reload
    # the chat prompt, three held-out rows as training text (<|im_start|>, <|im_end|> included), the fixed text
    assert reload["tokenizer_round_trip"] == {"exact": True, "texts": 5, "differing_texts": 0}, reload
    assert " " in reload["answer"] and "Ġ" not in reload["answer"]  # words, not raw byte-level symbols
    gguf_bytes = next(f["bytes"] for f in entry["files"] if f["name"].endswith(".gguf"))
    assert 130e6 < gguf_bytes < 160e6  # 135M parameters at about 8.5 bits each (q8_0)
    modelfile = (Path(config.run_dir) / "export/gguf/Modelfile").read_text()
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>" in modelfile
