"""GGUF made offline by one pinned llama.cpp (its converters, llama-quantize) and run by llama.cpp itself: the tiny
model through export_all (fast), and SmolLM2, a real pretrained model with a byte-level BPE tokenizer read from a
GGUF file, after the shared short SFT run: q8_0 and q4_k_m merged GGUFs and the adapter GGUF on a base GGUF."""
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

        assert save_method == "merged_16bit"  # what every merged GGUF starts from
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
    # llama.cpp itself ran the file on the prompt as the tuned model read it; near-ties of a random model make
    # its greedy path no measure of agreement, which the SmolLM2 test asserts
    llama = entry["llama_cpp"]
    assert llama["ran"] is True and llama["same_prompt_tokens"] is True and llama["model"] == "run.Q8_0.gguf", llama
    assert 0 <= llama["prefix_agreement"] <= llama["token_agreement"] <= 1 and llama["answer"]
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


def test_an_unknown_quantization_is_refused_naming_those_there_are(tmp_path):
    from helpers.gguf import convert

    with pytest.raises(ValueError, match="q3_k_s.*unknown.*q4_k_m, q5_k_m, f16, bf16, q8_0"):
        convert(tmp_path, tmp_path / "x.gguf", "q3_k_s")


class CharTokenizer:
    """One token per character, EOS 0: enough to follow llama_cpp_check's bookkeeping."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids if i)


def test_llama_cpp_agreement_is_teacher_forced_by_restarting_after_each_miss(monkeypatch):
    import helpers.gguf_check as gguf_check

    answer = "abcdefgh"  # the tuned model's answer, then EOS
    calls = []

    def completion(model, prompt, max_tokens, lora=None):  # a model that flips one near-tie, at position 2
        forced = prompt.removeprefix("P:")
        calls.append(forced)
        text = answer[len(forced):2] + "Xyz" if len(forced) <= 2 else answer[len(forced):]
        return {"text": text, "stopped_at_eos": len(forced) > 2, "prompt_ids": [ord(c) for c in prompt],
                "seconds": 1.0, "peak_rss_gib": 0.1, "peak_anon_gib": 0.05}

    monkeypatch.setattr(gguf_check, "completion", completion)
    expected = {"text": answer, "prompt_ids": [ord(c) for c in "P:"], "answer_ids": [ord(c) for c in answer] + [0]}
    result = gguf_check.llama_cpp_check(Path("m.gguf"), "P:", expected, CharTokenizer(), 32)
    assert calls == ["", "abc"]  # the second run starts after the missed token, the tuned one forced in its place
    assert result["prefix_agreement"] == round(2 / 9, 4)  # free-running: the flip costs everything after it
    assert result["token_agreement"] == round(8 / 9, 4)  # teacher-forced: it costs its own position only
    assert result["positions_checked"] == 9 and result["runs"] == 2 and result["same_prompt_tokens"] is True
    assert result["forced_runs_tokenized_otherwise"] == 0
    assert result["answer"] == "abXyz" and result["same_answer"] is False and result["seconds"] == 2.0
    with pytest.raises(ValueError, match="no tokens"):
        gguf_check.llama_cpp_check(Path("m.gguf"), "P:", {**expected, "answer_ids": []}, CharTokenizer(), 32)


def _modelfile_files(folder: Path) -> list[Path]:
    """The files a Modelfile's FROM and ADAPTER lines name, as Ollama resolves them (relative to the Modelfile)."""
    named = [line.split(" ", 1)[1] for line in (folder / "Modelfile").read_text().splitlines()
             if line.startswith(("FROM ", "ADAPTER "))]
    return [folder / name if not Path(name).is_absolute() else Path(name) for name in named]


@pytest.fixture(scope="module")
def smollm2_exports(smollm2_sft_run, tmp_path_factory):
    """The shared SmolLM2 SFT run exported twice from one loaded model: gguf q8_0 with the adapter GGUF, and
    merged_16bit then gguf q4_k_m converted from it (each into its own copy of the run, since a run holds one gguf
    folder)."""
    import shutil

    from helpers.export import export_all
    from helpers.modeling import load_trained_model

    root = tmp_path_factory.mktemp("smollm2-gguf")
    runs = {}
    model = tokenizer = None
    for name, formats, quantization in (("sft-q8", ["gguf", "gguf_lora"], "q8_0"), ("sft-q4", ["merged_16bit", "gguf"], "q4_k_m")):
        run = shutil.copytree(smollm2_sft_run, root / name, ignore=shutil.ignore_patterns("checkpoint-*", "export"))
        params = read_json(run / "run.json")["parameters"]
        config = RunConfig.from_dict({**params, "run_dir": str(run), "formats": formats,
                                      "gguf_quantization": quantization})
        if model is None:
            model, tokenizer = load_trained_model(config, "fp32", run / "adapter")
        runs[name] = (export_all(model, tokenizer, config, "fp32"), run)
    return runs


@pytest.mark.notebook
@pytest.mark.real_model
def test_smollm2_q8_0_answers_in_llama_cpp_as_the_tuned_model_does(smollm2_exports):
    manifest, run = smollm2_exports["sft-q8"]
    entry = manifest["formats"]["gguf"]
    assert entry["status"] == "ok" and entry["quantization"] == "q8_0", entry
    llama = entry["llama_cpp"]
    assert llama["ran"] and llama["same_prompt_tokens"] and llama["positions_checked"] == llama["answer_tokens"], llama
    assert llama["forced_runs_tokenized_otherwise"] == 0, llama  # each restart read the tuned tokens as forced
    assert llama["token_agreement"] >= 0.9, llama
    assert " " in llama["answer"] and "Ġ" not in llama["answer"]  # words, not raw byte-level symbols
    reload = entry["reload"]  # transformers' reload check, beside llama.cpp's
    assert reload["loaded"] is True and reload["token_agreement"] >= 0.9, reload
    # the chat prompt, three held-out rows as training text (<|im_start|>, <|im_end|> included), the fixed text
    assert reload["tokenizer_round_trip"] == {"exact": True, "texts": 5, "differing_texts": 0}, reload
    gguf_bytes = next(f["bytes"] for f in entry["files"] if f["name"].endswith(".gguf"))
    assert 130e6 < gguf_bytes < 160e6  # 135M parameters at about 8.5 bits each (q8_0)
    steps = entry["steps"]["convert"]
    assert steps["seconds"] > 0 and steps["peak_rss_gib"] > 0.1  # the converter's own process, measured
    assert entry["memory_while_written"]["peak_anon_gib"] > 0


@pytest.mark.notebook
@pytest.mark.real_model
def test_smollm2_adapter_gguf_on_the_base_gguf_answers_as_the_tuned_model_does(smollm2_exports):
    manifest, run = smollm2_exports["sft-q8"]
    entry = manifest["formats"]["gguf_lora"]
    assert entry["status"] == "ok", entry
    names = [f["name"] for f in entry["files"]]
    assert names == ["Modelfile", "README.md", "loss.png", "sft-q8.LoRA.F16.gguf"], names
    adapter_bytes = next(f["bytes"] for f in entry["files"] if f["name"].endswith(".gguf"))
    assert adapter_bytes < 0.1 * next(f["bytes"] for f in manifest["formats"]["gguf"]["files"]
                                      if f["name"].endswith(".gguf"))  # the adapter alone, not a model
    llama = entry["llama_cpp"]
    assert llama["adapter"] == "sft-q8.LoRA.F16.gguf" and llama["model"].endswith(".Q8_0.gguf"), llama
    assert llama["same_prompt_tokens"] and llama["token_agreement"] >= 0.9, llama
    from gguf import GGUFReader

    fields = GGUFReader(str(run / "export/gguf_lora/sft-q8.LoRA.F16.gguf")).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 32.0  # the profile's lora_alpha (r=16)


@pytest.mark.notebook
@pytest.mark.real_model
def test_smollm2_q4_k_m_is_made_offline_and_answers_in_llama_cpp(smollm2_exports):
    manifest, run = smollm2_exports["sft-q4"]
    entry = manifest["formats"]["gguf"]
    assert entry["status"] == "ok" and entry["quantization"] == "q4_k_m", entry
    assert set(entry["steps"]) - {"merged_from"} == {"convert", "quantize"}  # a 16-bit GGUF, then llama-quantize
    from gguf import GGUFReader, LlamaFileType

    path = run / "export/gguf/sft-q4.Q4_K_M.gguf"
    assert GGUFReader(str(path)).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    q8_bytes = next(f["bytes"] for f in smollm2_exports["sft-q8"][0]["formats"]["gguf"]["files"]
                    if f["name"].endswith(".gguf"))
    assert path.stat().st_size < 0.8 * q8_bytes
    llama = entry["llama_cpp"]
    assert llama["ran"] and llama["same_prompt_tokens"] and " " in llama["answer"], llama
    assert 0 <= llama["token_agreement"] <= 1  # stated in docs/exports.md, not a pass mark


@pytest.mark.notebook
@pytest.mark.real_model
def test_every_ollama_modelfile_names_files_that_exist(smollm2_exports):
    for name, export_format in (("sft-q8", "gguf"), ("sft-q8", "gguf_lora"), ("sft-q4", "gguf")):
        _, run = smollm2_exports[name]
        folder = run / "export" / export_format
        files = _modelfile_files(folder)
        assert len(files) == (2 if export_format == "gguf_lora" else 1), files
        assert all(path.is_file() and path.suffix == ".gguf" for path in files), files
        modelfile = (folder / "Modelfile").read_text()
        assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>" in modelfile


@pytest.mark.notebook
@pytest.mark.real_model
def test_a_gguf_converts_the_runs_merged_16bit_export_instead_of_merging_again(smollm2_exports):
    manifest, run = smollm2_exports["sft-q4"]
    merged, gguf = manifest["formats"]["merged_16bit"], manifest["formats"]["gguf"]
    assert merged["status"] == gguf["status"] == "ok", manifest
    assert gguf["steps"]["merged_from"] == (run / "export" / "merged_16bit").as_posix()
    # converted from it without changing it: its files are still the ones the manifest recorded
    from helpers.export import describe_files

    assert describe_files(run / "export" / "merged_16bit") == merged["files"]
