"""Exporting a finished run in the formats people deploy (LoRA adapter, merged 16-bit, merged 4-bit, GGUF of the
merged model, GGUF of the adapter alone).

Each format is written into a hidden temporary folder that is renamed to run_dir/export/<format>/ only once it
is complete (on Colab with run_dir on Drive, the large ones to the runtime's disk: helpers.export_room), loaded
back, and its greedy answer to a fixed prompt compared with the tuned model's, as a whole and token by token
(teacher-forced agreement); every GGUF is also run by llama.cpp itself. The memory each format took is watched
while it is written, and everything is recorded in run_dir/export/manifest.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from helpers.config import CHECK_PROMPT
from helpers.environment import hub_offline, in_colab, peak_memory, release_memory, reset_peak_memory
from helpers.export_room import (MEASURED_16BIT, MemoryWatch, available_memory, check_disk, drive_copy_verdict,
                                 export_folder, how_to_keep)
from helpers.gguf import ADAPTER_TYPE, QUANTIZER_TYPES, gguf_name, write_adapter_gguf, write_gguf
from helpers.gguf_check import llama_cpp_check, load_gguf, round_trip_texts, token_ids, tokenizer_round_trip
from helpers.llama_cpp import ensure_built
from helpers.model_card import write_model_card
from helpers.records import read_json, staged_folder, write_json
from helpers.timing import recorded

log = logging.getLogger(__name__)

# The order formats are saved in. On the GPU unsloth merges LoRA into the loaded 4-bit weights in place for
# merged_4bit, so the tuned model in memory is no longer the one the other formats start from: it goes last.
EXPORT_ORDER = ("lora", "gguf_lora", "merged_16bit", "gguf", "merged_4bit")
# unsloth's save_method per format (the GGUFs start from the adapter or the merged 16-bit checkpoint): current
# unsloth refuses plain "merged_4bit" and asks for the explicit one.
SAVE_METHODS = {"lora": "lora", "gguf_lora": "lora", "merged_16bit": "merged_16bit", "gguf": "merged_16bit",
                "merged_4bit": "merged_4bit_forced"}
GGUF_FORMATS = ("gguf", "gguf_lora")
# What every format is compared with: the tuned model in memory (the base as loaded, with the adapter). lora and
# merged_4bit are made from those very weights. merged_16bit is merged into the base's original 16-bit weights
# (for a pre-quantized base unsloth fetches them: `unsloth/X` for `unsloth/X-unsloth-bnb-4bit`), so after a 4-bit
# run its agreement also measures the 4-bit quantization of the base, and of the merge when checked in 4-bit.
REFERENCE = "the tuned model in memory: the base as loaded (4-bit after a 4-bit run) with the adapter"
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


def bytes_needed(export_format: str, model, quantization: str) -> int:
    """Disk an export of a merged model needs while it is written: the merged 16-bit checkpoint (2 bytes a
    parameter), for a GGUF also the file (llama.cpp's bits per weight), and for a k-quant the 16-bit GGUF
    llama-quantize reads."""
    from unsloth_zoo.disk_utils import GGUF_BITS_PER_WEIGHT, model_16bit_bytes

    sixteen_bit = model_16bit_bytes(model)
    if export_format != "gguf":
        return sixteen_bit
    return int(sixteen_bit * (1 + (quantization in QUANTIZER_TYPES) + GGUF_BITS_PER_WEIGHT[quantization] / 16))


def check_room(export_format: str, model, config, folder: Path, merged: Path | None = None) -> None:
    """Refuse a merged export (merged_16bit, gguf) that would not fit the disk folder lies on, before anything
    is written (gguf converting `merged`, the run's merged_16bit export, needs no merge of its own). Memory is not
    predicted: the merge is attempted and watched (MemoryWatch)."""
    need = bytes_needed(export_format, model, config.gguf_quantization)
    if export_format == "gguf" and merged is not None:
        need -= bytes_needed("merged_16bit", model, config.gguf_quantization)
    check_disk(need, folder, MEASURED_16BIT)


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


@contextlib.contextmanager
def cached_sixteen_bit_base(model) -> Iterator[str | None]:
    """With the Hub offline, point unsloth's 16-bit merge at the base's 16-bit original in the Hugging Face cache
    (yields its folder, or None where there is nothing to do). unsloth merges a pre-quantized base's LoRA into the
    16-bit original (unsloth/X-unsloth-bnb-4bit -> unsloth/X), which it looks for in a folder of that name, then
    asks the Hub; offline, that question fails the export although a download left the original in the cache."""
    name = model.config._name_or_path
    if not hub_offline() or Path(name).is_dir():
        yield None
        return
    from huggingface_hub import snapshot_download
    from unsloth.models.loader_utils import get_model_name

    original = get_model_name(name, load_in_4bit=False) or name
    try:
        folder = snapshot_download(original, local_files_only=True)
    except Exception:  # not cached: unsloth's own message names what is missing
        yield None
        return
    model.config._name_or_path = folder
    try:
        yield folder
    finally:
        model.config._name_or_path = name


def _merge(model, tokenizer, folder: Path, save_method: str, config) -> None:
    """unsloth's save_pretrained_merged, the base's 16-bit original taken from the cache when the Hub is offline."""
    with cached_sixteen_bit_base(model) if save_method == "merged_16bit" else contextlib.nullcontext():
        model.save_pretrained_merged(str(folder), tokenizer, save_method=save_method,
                                     maximum_memory_usage=merge_memory_share(config))


def _save(export_format: str, model, tokenizer, config, folder: Path) -> dict[str, Any]:
    """Write one format into folder through unsloth's own save methods (and llama.cpp's converters for the
    GGUFs); returns the steps run in processes of their own, with their seconds and peak memory."""
    merged = reusable_merge(config) if export_format == "gguf" else None  # hashes the adapter: once
    if export_format in ("merged_16bit", "gguf"):
        check_room(export_format, model, config, folder, merged)
    if export_format not in GGUF_FORMATS:
        _merge(model, tokenizer, folder, SAVE_METHODS[export_format], config)
        if export_format != "lora":
            _check_merged(folder)
        return {}
    ensure_built()  # llama.cpp's tools before the merge (built once, minutes): no checkpoint made for nothing
    if merged is not None:  # no second 16 GB merge
        return {"merged_from": merged.as_posix(), **write_gguf(merged, folder, config, tokenizer)}
    source = folder / ("merged" if export_format == "gguf" else "adapter")  # deleted once converted
    _merge(model, tokenizer, source, SAVE_METHODS[export_format], config)
    if export_format == "gguf":
        _check_merged(source)
        steps = write_gguf(source, folder, config, tokenizer)
    else:
        steps = write_adapter_gguf(source, folder, config, tokenizer)
    shutil.rmtree(source)
    return steps


def adapter_digest(run_dir: str | Path) -> str:
    """The SHA-256 of the run's saved adapter weights: what a merged export was made from."""
    digest = hashlib.sha256()
    with (Path(run_dir) / "adapter" / "adapter_model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reusable_merge(config) -> Path | None:
    """The run's merged_16bit export when it is complete and was merged from the adapter saved now (the manifest
    says so), for the gguf format to convert instead of merging again; else None."""
    manifest = export_dir(config.run_dir) / "manifest.json"
    entry = read_json(manifest).get("formats", {}).get("merged_16bit", {}) if manifest.exists() else {}
    folder = export_folder("merged_16bit", config.run_dir, in_colab())
    if entry.get("status") != "ok" or entry.get("from_adapter") != adapter_digest(config.run_dir):
        return None
    return folder if folder.is_dir() else None


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
    if export_format == "gguf" and (problem := gguf_reload_problem(tuned[0], precision)):
        log.warning("transformers' reload of the GGUF is skipped: %s", problem)
        return {"loaded": False, "skipped": problem}
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


def gguf_reload_problem(model, precision: str) -> str | None:
    """Why transformers' reload of a GGUF cannot be afforded here, or None: it dequantizes the whole model into
    host memory (16 GB in fp16 for an 8B model), about twice that at its peak. llama.cpp's run is the GGUF's
    check that users' tools make; this one is extra, and skipped rather than risk the runtime."""
    from unsloth_zoo.disk_utils import model_logical_numel

    need = 2 * model_logical_numel(model) * (4 if precision == "fp32" else 2)
    available = available_memory()
    if available is None or need <= available:
        return None
    return (f"dequantized in {precision} it takes about {need / 1e9:.1f} GB of host memory at its peak, and "
            f"{available / 1e9:.1f} GB are available here")


def run_in_llama_cpp(export_format: str, folder: Path, config, expected: dict[str, Any], tokenizer,
                     steps: dict[str, Any]) -> dict[str, Any]:
    """Run the GGUF in llama.cpp (the adapter on the base GGUF its steps made) and compare its greedy answer with
    the tuned one."""
    from helpers.prompts import format_generation_prompt

    prompt = format_generation_prompt(config.prompt_template, CHECK_PROMPT, tokenizer, config.system_prompt)
    if export_format == "gguf":
        return llama_cpp_check(folder / gguf_name(config.run_dir, config.gguf_quantization), prompt, expected,
                               tokenizer, CHECK_TOKENS)
    adapter = folder / gguf_name(config.run_dir, ADAPTER_TYPE, adapter=True)
    return llama_cpp_check(Path(steps["base_gguf"]["path"]), prompt, expected, tokenizer, CHECK_TOKENS, lora=adapter)


def _location(final: Path, config) -> str:
    """The manifest's path of a format: relative to run_dir when it lies there, else absolute."""
    run_dir = Path(config.run_dir)
    return final.relative_to(run_dir).as_posix() if final.is_relative_to(run_dir) else str(final)


def _copy_to_drive(entry: dict[str, Any], final: Path, config) -> dict[str, Any]:
    """For a format written to the Colab runtime's disk: copy it into run_dir/export on Drive where it fits, and
    say where it is and how to keep what stays behind."""
    target = export_dir(config.run_dir) / entry["format"]
    files = [f["name"] for f in entry["files"]]
    verdict = drive_copy_verdict(entry["total_bytes"], shutil.disk_usage(target.parent).free)
    if verdict is None:
        with staged_folder(target) as folder:
            shutil.copytree(final, folder, dirs_exist_ok=True)
        return {"written_to": str(final), "copied_to": target.relative_to(config.run_dir).as_posix()}
    return {"written_to": str(final), "not_copied": verdict, "to_keep_it": how_to_keep(final, files)}


@recorded("export {export_format}")
def export_format(export_format: str, model, tokenizer, config, precision: str, expected: dict[str, Any],
                  progress=None) -> dict[str, Any]:
    """Save one format through a temporary folder, write its model card, reload and check it; return its record.
    While it is written its memory is watched; progress (if given) gets the entry with the peaks so far.

    unsloth refusing the format (NotImplementedError) is recorded as 'refused' with its reason, any other
    error (a failed reload check too) as 'failed'; neither leaves a folder behind, and an earlier export of the
    format stays as it was.
    """
    final = export_folder(export_format, config.run_dir, in_colab())
    entry: dict[str, Any] = {"format": export_format, "path": _location(final, config)}
    if export_format in GGUF_FORMATS:
        entry["quantization"] = config.gguf_quantization
    entry["save_method"] = SAVE_METHODS[export_format]
    if export_format == "merged_16bit":
        entry["from_adapter"] = adapter_digest(config.run_dir)  # the gguf format may convert this export later
    started = time.perf_counter()
    reset_peak_memory()
    report = (lambda peaks: progress({**entry, "status": "running", "memory_so_far": peaks})) if progress else None
    try:
        with staged_folder(final) as folder:
            with MemoryWatch(report) as watch:
                entry["steps"] = _save(export_format, model, tokenizer, config, folder)
            entry["memory_while_written"] = watch.peaks()
            write_model_card(folder, config, export_format)
            with MemoryWatch(report) as watch:
                if export_format != "gguf_lora":  # transformers cannot load an adapter GGUF; llama.cpp checks it
                    entry["reload"] = reload_check(export_format, folder, config, precision, expected,
                                                   (model, tokenizer))
                    if "error" in entry["reload"]:  # a format that does not load back is not exported
                        raise RuntimeError(f"the reload check failed: {entry['reload']['error']}")
                if export_format in GGUF_FORMATS:
                    entry["llama_cpp"] = run_in_llama_cpp(export_format, folder, config, expected, tokenizer,
                                                          entry["steps"])
            entry["memory_while_checked"] = watch.peaks()
            entry["files"] = describe_files(folder)
    except NotImplementedError as error:
        log.warning("%s refused by unsloth: %s", export_format, error)
        return {**entry, "status": "refused", "reason": str(error)}
    except Exception as error:
        log.warning("%s export failed: %s", export_format, error)
        reason = str(error) if type(error) is RuntimeError else f"{type(error).__name__}: {error}"
        return {**entry, "status": "failed", "reason": reason}
    entry["total_bytes"] = sum(f["bytes"] for f in entry["files"])
    if not final.is_relative_to(config.run_dir):
        entry["where"] = _copy_to_drive(entry, final, config)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    entry["memory"] = peak_memory()  # GPU peaks of this format's save and reload check; RSS of the process
    return {**entry, "status": "ok"}


def export_all(model, tokenizer, config, precision: str) -> dict[str, Any]:
    """Export every requested format; returns the manifest, rewritten to export/manifest.json after each one
    (and every few seconds while a format is written, with its memory so far).

    Entries of formats exported by an earlier call and not asked for now are kept.
    """
    out = export_dir(config.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    manifest = read_json(path) if path.exists() else {"formats": {}}
    expected = greedy_answer(model, tokenizer, config)
    if "gguf" in config.formats:  # the texts whose token ids the GGUF file's tokenizer must reproduce
        texts = round_trip_texts(tokenizer, config, CHECK_PROMPT)
        expected.update(texts=texts, token_ids=token_ids(tokenizer, texts))
    manifest.update(run_dir=str(config.run_dir), base_model=config.model_name,
                    check={"prompt": CHECK_PROMPT, "max_new_tokens": CHECK_TOKENS, "expected_answer": expected["text"],
                           "reference": REFERENCE})
    for name in sorted(set(config.formats), key=EXPORT_ORDER.index):
        log.info("exporting %s", name)
        previous = manifest["formats"].get(name)

        def progress(running: dict[str, Any], name: str = name) -> None:
            write_json(path, {**manifest, "formats": {**manifest["formats"], name: running}})

        entry = export_format(name, model, tokenizer, config, precision, expected, progress)
        if previous and previous.get("status") == "running":  # the process was killed while writing it
            log.warning("the last export of %s did not finish; its memory then: %s", name, previous["memory_so_far"])
            entry["killed_before"] = previous["memory_so_far"]
        elif entry["status"] != "ok" and previous and export_folder(name, config.run_dir, in_colab()).is_dir():
            entry["previous"] = previous  # still on disk: what it is, not what was asked
        manifest["formats"][name] = entry
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(path, manifest)
    return manifest


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """The manifest as a table: status, size, the reload check, the llama.cpp run, peak memory and where each
    format is (and how to keep it, where it is only on a Colab runtime's disk)."""
    rows = ["| format | status | size | reloaded: same answer, token agreement | llama.cpp: same answer, token "
            "agreement, prefix | peak anonymous / RSS GiB | where | note |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in manifest["formats"].items():
        reload, llama, where = entry.get("reload", {}), entry.get("llama_cpp", {}), entry.get("where", {})
        memory = entry.get("memory_while_written", {})
        note = (entry.get("reason") or reload.get("error") or where.get("to_keep_it")
                or (f"transformers' reload skipped: {reload['skipped']}" if "skipped" in reload else ""))
        size = f"{entry['total_bytes'] / 2**20:.1f} MiB" if "total_bytes" in entry else ""
        rows.append(f"| {name} | {entry['status']} | {size} | "
                    f"{_pair(reload.get('same_answer'), reload.get('token_agreement'))} | "
                    f"{_pair(llama.get('same_answer'), llama.get('token_agreement'))}"
                    f"{'' if 'prefix_agreement' not in llama else ', ' + str(llama['prefix_agreement'])} | "
                    f"{_pair(memory.get('peak_anon_gib'), memory.get('peak_rss_gib'), ' / ')} | "
                    f"{where.get('copied_to') or entry.get('path', '')} | {note.replace('|', '/')} |")
    return "\n".join(rows)


def _pair(first: Any, second: Any, between: str = ", ") -> str:
    return "" if first is None and second is None else f"{first}{between}{second}"


def check_all_exported(config, manifest: dict[str, Any]) -> None:
    """Raise, naming each one and why, when a requested format was not exported."""
    missing = {name: manifest["formats"][name].get("reason", "") for name in config.formats
               if manifest["formats"].get(name, {}).get("status") != "ok"}
    if missing:
        raise RuntimeError("not exported: " + "; ".join(f"{name} ({reason})" for name, reason in missing.items())
                           + f". The other formats are complete in {export_dir(config.run_dir)}.")
