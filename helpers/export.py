"""Exporting a finished run in the formats people deploy (LoRA adapter, merged 16-bit, merged 4-bit, GGUF).

Each format is written into a hidden temporary folder that is renamed to run_dir/export/<format>/ only once it
is complete, loaded back, and its greedy answer to a fixed prompt compared with the tuned model's, as a whole
and token by token (teacher-forced agreement); the result is recorded in run_dir/export/manifest.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from helpers.environment import peak_memory, release_memory, reset_peak_memory
from helpers.gguf import (OFFLINE_QUANTIZATIONS, load_gguf, round_trip_texts, token_ids, tokenizer_round_trip,
                          write_gguf)
from helpers.model_card import write_model_card
from helpers.records import read_json, staged_folder, write_json
from helpers.timing import recorded

log = logging.getLogger(__name__)

# The order formats are saved in. On the GPU unsloth merges LoRA into the loaded 4-bit weights in place for
# merged_4bit, so the tuned model in memory is no longer the one the other formats start from: it goes last.
EXPORT_ORDER = ("lora", "merged_16bit", "gguf", "merged_4bit")
# unsloth's save_method per format: current unsloth refuses plain "merged_4bit" and asks for the explicit one.
SAVE_METHODS = {"lora": "lora", "merged_16bit": "merged_16bit", "merged_4bit": "merged_4bit_forced"}
# What every format is compared with: the tuned model in memory (the base as loaded, with the adapter). lora and
# merged_4bit are made from those very weights. merged_16bit is merged into the base's original 16-bit weights
# (for a pre-quantized base unsloth fetches them: `unsloth/X` for `unsloth/X-unsloth-bnb-4bit`), so after a 4-bit
# run its agreement also measures the 4-bit quantization of the base, and of the merge when checked in 4-bit.
REFERENCE = "the tuned model in memory: the base as loaded (4-bit after a 4-bit run) with the adapter"
CHECK_PROMPT = "What's your favorite way to spend a rainy Sunday?"
CHECK_TOKENS = 32


def export_dir(run_dir: str | Path) -> Path:
    """Where a run's exports go: run_dir/export."""
    return Path(run_dir) / "export"


def greedy_answer(model, tokenizer, config) -> dict[str, Any]:
    """The model's greedy answer to the fixed check prompt, in the run's template: its text, and the prompt and
    answer token ids."""
    from helpers.inference import generate_tokens

    prompt_ids, answer_ids = generate_tokens(model, tokenizer, CHECK_PROMPT, config.prompt_template, CHECK_TOKENS,
                                             temperature=0.0, system_prompt=config.system_prompt)
    return {"text": tokenizer.decode(answer_ids, skip_special_tokens=True).strip(), "prompt_ids": prompt_ids,
            "answer_ids": answer_ids}


def token_agreement(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """The share of the expected answer's tokens that this model also picks greedily, each given the same tokens
    before it (teacher-forced). 1.0 means it would answer the same way at every step; unlike comparing whole
    answers, one early flip (a near tie, say, after quantization) does not count as a total mismatch."""
    import torch

    if not answer_ids:
        raise ValueError("the expected answer has no tokens; there is nothing to agree on")
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:-1]
    return (logits.argmax(-1).cpu() == torch.tensor(answer_ids)).float().mean().item()


def describe_files(folder: Path) -> list[dict[str, Any]]:
    """Every file under folder: its relative name, size in bytes and SHA-256."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        files.append({"name": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size,
                      "sha256": digest.hexdigest()})
    return files


def llama_cpp_problem() -> str | None:
    """Why unsloth cannot make GGUF files here (no llama.cpp and no way to fetch it), or None."""
    from unsloth_zoo.llama_cpp import LLAMA_CPP_DEFAULT_DIR, check_llama_cpp

    folders = (LLAMA_CPP_DEFAULT_DIR, os.path.join(os.getcwd(), "llama.cpp"))
    for folder in folders:
        with contextlib.suppress(Exception):
            check_llama_cpp(llama_cpp_folder=folder)
            return None
    offline = any(os.environ.get(name, "").strip().upper() in ("1", "ON", "TRUE", "YES")
                  for name in ("UNSLOTH_LLAMA_CPP_OFFLINE", "UNSLOTH_OFFLINE"))
    if not offline:
        try:
            socket.create_connection(("github.com", 443), timeout=5).close()
            return None  # unsloth can fetch or build llama.cpp on first use
        except OSError:
            pass
    return (f"GGUF needs llama.cpp, which is not installed (looked in {' and '.join(folders)}) and cannot be "
            "fetched or built without network access to github.com. Install and build llama.cpp there (or set "
            "UNSLOTH_LLAMA_CPP_PATH to a built copy), then run this notebook again with formats=['gguf'].")


# Host memory a merged 16-bit export took, per byte it wrote: measured on the H200 for the 8B stand-in (2026-11-30,
# bench/gpu_colab_t4.sh), the merge and its 4-bit reload check peaked at 31.8 GiB RSS for 14.96 GiB written.
MERGE_RAM_PER_BYTE = 31.8 / 14.96


def check_room(model, folder: Path) -> None:
    """Refuse a merged 16-bit save (merged_16bit, and gguf made from it) that would not fit the disk folder lies on
    (2 bytes a parameter: 16 GB for an 8B model, more than a free Google Drive holds) or this machine's memory
    (about twice that, measured: a free Colab's 12.7 GB would kill the runtime), before anything is written."""
    import psutil
    from unsloth_zoo.disk_utils import model_16bit_bytes

    need, free = model_16bit_bytes(model), shutil.disk_usage(folder.parent).free  # folder itself may not exist yet
    if need > free:
        raise RuntimeError(f"a merged 16-bit checkpoint needs about {need / 1e9:.1f} GB in {folder.parent}, where "
                           f"{free / 1e9:.1f} GB are free; free space there, or leave merged_16bit and gguf out of "
                           "formats (the lora adapter is far smaller)")
    ram, total = need * MERGE_RAM_PER_BYTE, psutil.virtual_memory().total
    if ram > total:
        raise RuntimeError(f"a merged 16-bit checkpoint of this model needs about {ram / 1e9:.0f} GB of memory to "
                           f"write and check (measured: 31.8 GiB for an 8B model), and this machine has "
                           f"{total / 1e9:.1f} GB; export it on a machine with more memory, or keep the lora adapter")


def merge_memory_share(config) -> float:
    """unsloth's maximum_memory_usage for a merge: the share of the GPU's whole memory its merged weights may
    hold before it spills them to disk. unsloth reads the card's total, not a per-process cap, so under
    max_gpu_memory_gib (a T4 stood in for) the share shrinks to keep the merge within the cap."""
    import torch

    from helpers.environment import gpu_total_gib

    share = 0.75  # unsloth's default
    if config.max_gpu_memory_gib and torch.cuda.is_available():
        share = min(share, share * config.max_gpu_memory_gib / gpu_total_gib())
    return share


def _save(export_format: str, model, tokenizer, config, folder: Path) -> None:
    """Write one format into folder through unsloth's own save methods."""
    if export_format != "gguf":
        if export_format == "merged_16bit":
            check_room(model, folder)
        model.save_pretrained_merged(str(folder), tokenizer, save_method=SAVE_METHODS[export_format],
                                     maximum_memory_usage=merge_memory_share(config))
        if export_format != "lora":
            _check_merged(folder)
        return
    if config.gguf_quantization in OFFLINE_QUANTIZATIONS:  # llama.cpp's converter, in Python: no build needed
        merged = folder / "merged"
        _save("merged_16bit", model, tokenizer, config, merged)
        write_gguf(merged, folder, config)
        shutil.rmtree(merged)
        return
    problem = llama_cpp_problem()
    if problem:
        raise RuntimeError(problem)
    staging = folder / "staging"
    try:
        result = model.save_pretrained_gguf(str(staging), tokenizer, quantization_method=config.gguf_quantization)
    except Exception as error:
        raise RuntimeError(f"unsloth's save_pretrained_gguf failed (it needs llama.cpp, fetched or built on first "
                           f"use): {error}") from error
    # The CPU backend returns the paths and writes them into staging; the GPU one returns a dict and writes
    # them into the sibling staging_gguf. Either way only the GGUF files (and an Ollama Modelfile) are kept.
    paths = result.get("gguf_files", []) if isinstance(result, dict) else list(result or [])
    gguf_dir = Path(paths[0]).parent if paths else staging
    for path in [*map(Path, paths), gguf_dir / "Modelfile"]:
        if path.is_file():
            shutil.move(str(path), folder / path.name)
    for leftover in (staging, Path(f"{staging}_gguf")):
        shutil.rmtree(leftover, ignore_errors=True)
    if not any(folder.glob("*.gguf")):
        raise RuntimeError(f"unsloth's save_pretrained_gguf wrote no .gguf file (it returned {result!r})")


def _check_merged(folder: Path) -> None:
    """Refuse a 'merged' checkpoint that still holds LoRA layers (a save bound to the bare base model)."""
    from safetensors import safe_open

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            if any(".lora_A." in key or ".base_layer." in key for key in weights.keys()):
                raise RuntimeError(f"{path.name} holds un-merged LoRA layers; unsloth's merge did not happen")


def reloads_in_4bit(export_format: str, config) -> bool:
    """Whether the reload check loads a merged format in 4-bit. merged_16bit is checked in 4-bit when the run
    trained in 4-bit: its 16-bit weights (15 GiB for an 8B model) do not fit beside the tuned model in a T4's 15 GiB."""
    return export_format == "merged_4bit" or config.load_in_4bit


def _reload(export_format: str, folder: Path, config, precision: str):
    """Load one exported format back as a user would."""
    from helpers.environment import torch_dtype

    if export_format == "gguf":
        return load_gguf(folder, precision)  # transformers dequantizes it; needs the `gguf` package
    from helpers.stack import FastLanguageModel

    load_in_4bit = reloads_in_4bit(export_format, config)  # lora is checked on the model in memory (_loaded)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=config.max_seq_length,
                                                         dtype=torch_dtype(precision), load_in_4bit=load_in_4bit)
    FastLanguageModel.for_inference(model)
    return model, tokenizer


CHECK_ADAPTER = "export_check"


@contextlib.contextmanager
def _loaded(export_format: str, folder: Path, config, precision: str, tuned: tuple) -> Iterator[tuple]:
    """The export loaded back as a user would. The lora adapter goes onto the base weights already in memory,
    beside the tuned adapter, as PeftModel.from_pretrained puts it onto a base: a second copy of an 8B base next
    to the tuned model would take a T4 to its 15 GiB. Any other format loads as a model of its own, freed after."""
    if export_format == "lora":
        model, tokenizer = tuned
        model.load_adapter(str(folder), adapter_name=CHECK_ADAPTER)
        model.set_adapter(CHECK_ADAPTER)
        try:
            yield model, tokenizer
        finally:
            model.set_adapter("default")
            model.delete_adapter(CHECK_ADAPTER)
        return
    model, tokenizer = _reload(export_format, folder, config, precision)
    try:
        yield model, tokenizer
    finally:
        del model
        release_memory()


def reload_check(export_format: str, folder: Path, config, precision: str, expected: dict[str, Any],
                 tuned: tuple) -> dict[str, Any]:
    """Load the export back and compare its greedy answer to the check prompt with the tuned model's (`tuned`:
    the model and tokenizer in memory): the whole answer, and the token-by-token agreement."""
    loaded = False
    try:
        with _loaded(export_format, folder, config, precision, tuned) as (model, tokenizer):
            loaded = True
            answer = greedy_answer(model, tokenizer, config)["text"]
            agreement = token_agreement(model, expected["prompt_ids"], expected["answer_ids"])
            tokenizer_check = ({"tokenizer_round_trip": tokenizer_round_trip(tokenizer, expected["texts"],
                                                                             expected["token_ids"])}
                               if export_format == "gguf" else {})
    except Exception as error:  # recorded, not raised: the files are written, only the check failed
        log.warning("reloading %s failed: %s", export_format, error)
        return {"loaded": loaded, "error": f"{type(error).__name__}: {error}", "same_answer": False}
    loaded_in = {"lora": "onto the base weights in memory", "gguf": precision}.get(
        export_format, "4-bit" if reloads_in_4bit(export_format, config) else precision)
    return {"loaded": True, "loaded_in": loaded_in, "same_answer": answer == expected["text"],
            "token_agreement": round(agreement, 4), "answer": answer, "expected": expected["text"], **tokenizer_check}


@recorded("export {export_format}")
def export_format(export_format: str, model, tokenizer, config, precision: str,
                  expected: dict[str, Any]) -> dict[str, Any]:
    """Save one format through a temporary folder, write its model card, reload and check it; return its record.

    unsloth refusing the format (NotImplementedError) is recorded as 'refused' with its reason, any other
    error (a failed reload check too) as 'failed'; neither leaves a folder behind, and an earlier export of the
    format stays as it was.
    """
    final = export_dir(config.run_dir) / export_format
    entry: dict[str, Any] = {"format": export_format, "path": final.relative_to(config.run_dir).as_posix()}
    if export_format == "gguf":
        entry["quantization"] = config.gguf_quantization
    else:
        entry["save_method"] = SAVE_METHODS[export_format]
    started = time.perf_counter()
    reset_peak_memory()
    try:
        with staged_folder(final) as folder:
            _save(export_format, model, tokenizer, config, folder)
            write_model_card(folder, config, export_format)
            entry["reload"] = reload_check(export_format, folder, config, precision, expected, (model, tokenizer))
            if "error" in entry["reload"]:  # a format that does not load back is not exported
                raise RuntimeError(f"the reload check failed: {entry['reload']['error']}")
            entry["files"] = describe_files(folder)
    except NotImplementedError as error:
        log.warning("%s refused by unsloth: %s", export_format, error)
        return {**entry, "status": "refused", "reason": str(error)}
    except Exception as error:
        log.warning("%s export failed: %s", export_format, error)
        reason = str(error) if type(error) is RuntimeError else f"{type(error).__name__}: {error}"
        return {**entry, "status": "failed", "reason": reason}
    entry["total_bytes"] = sum(f["bytes"] for f in entry["files"])
    entry["seconds"] = round(time.perf_counter() - started, 1)
    entry["memory"] = peak_memory()  # GPU peaks of this format's save and reload check; RSS of the process
    return {**entry, "status": "ok"}


def export_all(model, tokenizer, config, precision: str) -> dict[str, Any]:
    """Export every requested format; returns the manifest, rewritten to export/manifest.json after each one.

    Entries of formats exported by an earlier call and not asked for now are kept.
    """
    out = export_dir(config.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    manifest = read_json(path) if path.exists() else {"formats": {}}
    expected = greedy_answer(model, tokenizer, config)
    if "gguf" in config.formats:  # the texts whose token ids the GGUF file's tokenizer must reproduce
        texts = round_trip_texts(tokenizer, config)
        expected.update(texts=texts, token_ids=token_ids(tokenizer, texts))
    manifest.update(run_dir=str(config.run_dir), base_model=config.model_name,
                    check={"prompt": CHECK_PROMPT, "max_new_tokens": CHECK_TOKENS, "expected_answer": expected["text"],
                           "reference": REFERENCE})
    for name in sorted(set(config.formats), key=EXPORT_ORDER.index):
        log.info("exporting %s", name)
        previous = manifest["formats"].get(name)
        manifest["formats"][name] = export_format(name, model, tokenizer, config, precision, expected)
        if manifest["formats"][name]["status"] != "ok" and previous and (out / name).is_dir():
            manifest["formats"][name]["previous"] = previous  # still on disk: what it is, not what was asked
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(path, manifest)
    return manifest


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """The manifest as a table: status, files, size and the reload check of each format."""
    rows = ["| format | status | files | size | reloaded | same greedy answer | token agreement | note |",
            "|---|---|---|---|---|---|---|---|"]
    for name, entry in manifest["formats"].items():
        reload = entry.get("reload", {})
        note = entry.get("reason") or reload.get("error") or ""
        size = f"{entry['total_bytes'] / 2**20:.1f} MiB" if "total_bytes" in entry else ""
        rows.append(f"| {name} | {entry['status']} | {len(entry.get('files', []))} | {size} | "
                    f"{reload.get('loaded', '')} | {reload.get('same_answer', '')} | "
                    f"{reload.get('token_agreement', '')} | {note.replace('|', '/')} |")
    return "\n".join(rows)


def check_all_exported(config, manifest: dict[str, Any]) -> None:
    """Raise, naming each one and why, when a requested format was not exported."""
    missing = {name: manifest["formats"][name].get("reason", "") for name in config.formats
               if manifest["formats"].get(name, {}).get("status") != "ok"}
    if missing:
        raise RuntimeError("not exported: " + "; ".join(f"{name} ({reason})" for name, reason in missing.items())
                           + f". The other formats are complete in {export_dir(config.run_dir)}.")
