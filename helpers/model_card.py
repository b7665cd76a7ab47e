"""The model card (README.md) of an export, written from what the run recorded: run.json, and eval.json when present."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from helpers.config import CHECK_PROMPT
from helpers.data import is_local_path
from helpers.environment import hub_offline
from helpers.prompts import format_generation_prompt
from helpers.records import atomic_write_text, read_json

FORMAT_TITLES = {
    "lora": "LoRA adapter",
    "merged_16bit": "merged 16-bit weights",
    "merged_4bit": "merged 4-bit weights (bitsandbytes)",
    "gguf": "GGUF for llama.cpp and Ollama",
    "gguf_lora": "LoRA adapter as GGUF, for llama.cpp and Ollama on a GGUF of the base model",
}
# Licenses the Hub's `license:` field takes by id (a few of its list); any other is written as license: other with
# its name in license_name.
HUB_LICENSES = ("apache-2.0", "mit", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma",
                "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "openrail", "bigscience-openrail-m", "unknown")
# (key in eval.json, label, digits)
EVAL_METRICS = (("loss", "loss", 4), ("perplexity", "perplexity", 2), ("preference_accuracy", "preference accuracy", 3),
                ("mean_margin", "mean margin", 4))


def model_source(config, export_format: str) -> str:
    """Where a user loads this export from: its Hub repo when hub_repo_id is set, else its local folder."""
    from helpers.hub import repo_for

    if config.hub_repo_id:
        return repo_for(config.hub_repo_id, export_format)
    return (Path(config.run_dir) / "export" / export_format).as_posix()


def write_model_card(folder: Path, config, export_format: str) -> Path:
    """Write folder/README.md for one export (and copy the run's loss plot beside it)."""
    run_dir = Path(config.run_dir)
    record = read_json(run_dir / "run.json")
    evaluation = read_json(run_dir / "eval.json") if (run_dir / "eval.json").exists() else None
    has_plot = (run_dir / "loss.png").exists()
    if has_plot:
        shutil.copyfile(run_dir / "loss.png", folder / "loss.png")
    gguf_files = sorted(p.name for p in folder.glob("*.gguf"))
    text = model_card(record, evaluation, export_format, model_source(config, export_format), has_plot, gguf_files,
                      base_model_license(config.model_name))
    return atomic_write_text(folder / "README.md", text)


def base_model_license(model_name: str) -> str:
    """The base model's license as its own model card names it (`license:` in README.md's front matter, or
    `license_name:` for 'other'): a local folder's, or a Hub model's (from the local cache, else fetched where the
    Hub can be reached); 'unknown' where no card says."""
    card = None
    if is_local_path(model_name):
        card = Path(model_name).expanduser() / "README.md"
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(model_name, "README.md")
        if isinstance(cached, str):
            card = Path(cached)
        elif not hub_offline():
            try:
                card = Path(hf_hub_download(model_name, "README.md"))
            except Exception:  # no card, no network, a gated repo: the license stays unknown
                card = None
    if card is None or not card.is_file():
        return "unknown"
    text = card.read_text(encoding="utf-8", errors="replace")
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    found = dict(line.split(":", 1) for line in front.splitlines() if ":" in line and not line.startswith(" "))
    license_id = found.get("license", "").strip().strip("'\"")
    if license_id == "other" and found.get("license_name", "").strip():
        return found["license_name"].strip().strip("'\"")
    return license_id or "unknown"


def model_card(record: dict[str, Any], evaluation: dict[str, Any] | None, export_format: str, source: str,
               has_plot: bool = True, gguf_files: list[str] | None = None, base_license: str = "unknown") -> str:
    """The card's Markdown: front matter, what it is, the recipe, training figures, evaluation, usage, license."""
    p = record["parameters"]
    dpo = record.get("stage") == "dpo"
    how = (f"preference-tuned (DPO: `{p['response_field']}` over `{p['rejected_field']}`) with unsloth and trl's "
           f"`DPOTrainer`" + (", continuing an SFT adapter" if p.get("sft_run_dir") else "") if dpo else
           f"(`{p['prompt_field']}` → `{p['response_field']}`), trained with unsloth and trl's `SFTTrainer`")
    sections = [
        _front_matter(p, export_format, dpo, base_license),
        f"# {_title(source)} ({FORMAT_TITLES[export_format]})\n\n"
        f"A LoRA fine-tune of `{p['model_name']}` on `{p['dataset']}` {how}. This is the "
        f"{FORMAT_TITLES[export_format]}.",
        "## Recipe\n\n" + _table(_recipe(p, record)),
        "## Training\n\n" + _table(_figures(record)) + ("\n\n![Training loss](loss.png)" if has_plot else ""),
    ]
    if evaluation:
        sections.append(_evaluation(evaluation))
    sections.append("## Usage\n\n" + _usage(p, export_format, source, gguf_files or []))
    sections.append("## License\n\n" + (
        f"The base model's license applies to these weights: `{base_license}`, as `{p['model_name']}`'s model card "
        "names it. Check it, and the dataset's terms, before you share or deploy them." if base_license != "unknown"
        else f"The base model's license is unknown here: `{p['model_name']}` has no model card naming one where "
        "this export was made. Its license applies to these weights; find it before you share or deploy them."))
    return "\n\n".join(sections) + "\n"


def _front_matter(p: dict[str, Any], export_format: str, dpo: bool = False, base_license: str = "unknown") -> str:
    library = {"lora": "peft", "gguf": "gguf", "gguf_lora": "gguf"}.get(export_format, "transformers")
    known = base_license in HUB_LICENSES
    lines = ["---", f"library_name: {library}", "pipeline_tag: text-generation",
             f"license: {base_license if known else 'other'}",
             *([] if known else [f"license_name: {base_license}"]), "tags:"]
    tags = ("unsloth", "trl", "dpo" if dpo else "sft", "lora", *(["gguf"] if export_format.startswith("gguf") else []))
    lines += [f"- {tag}" for tag in tags]
    if not is_local_path(p["model_name"]):
        lines.append(f"base_model: {p['model_name']}")
    if not is_local_path(p["dataset"]):
        lines += ["datasets:", f"- {p['dataset']}"]
    return "\n".join([*lines, "---"])


def _recipe(p: dict[str, Any], record: dict[str, Any]) -> list[tuple[str, Any]]:
    steps = f"{p['max_steps']} steps" if p.get("max_steps") else f"{p['num_train_epochs']} epochs"
    return [
        ("base model", f"`{p['model_name']}` ({'4-bit' if p['load_in_4bit'] else 'full'} weights while training)"),
        ("dataset", f"`{p['dataset']}` (split `{p['dataset_split']}`)"),
        ("prompt template", p["prompt_template"]),
        ("LoRA", f"r={p['lora_r']}, alpha={p['lora_alpha']}, dropout={p['lora_dropout']} on "
                 f"{', '.join(p['target_modules'])}"),
        ("optimisation", f"{p['optim']}, learning rate {p['learning_rate']} ({p['lr_scheduler_type']}, "
                         f"{p['warmup_steps']} warm-up steps), weight decay {p['weight_decay']}"),
        ("batch", f"{p['per_device_train_batch_size']} × {p['gradient_accumulation_steps']} accumulation, {steps}"),
        ("sequence length", p["max_seq_length"]),
        ("precision", record.get("precision", p["precision"])),
        ("seed", p["seed"]),
        *([("preference tuning", f"DPO, loss {p['loss_type']}, beta {p['beta']}, reference: {record.get('reference')}")]
          if record.get("stage") == "dpo" else []),
    ]


def _figures(record: dict[str, Any]) -> list[tuple[str, Any]]:
    m = record.get("metrics", {})
    accelerator = record.get("accelerator") or record.get("environment", {}).get("accelerator", {})
    memory = (f"{m['peak_gpu_reserved_gib']} GiB GPU reserved" if m.get("peak_gpu_reserved_gib") is not None
              else f"{m.get('peak_rss_gib')} GiB RSS")
    rows = [
        ("device", accelerator.get("name", "")),
        ("steps", m.get("steps")),
        ("training time", f"{m.get('train_runtime_s')} s"),
        ("trained tokens", f"{m.get('trained_tokens')} ({m.get('tokens_per_s')} tokens/s)"),
        ("loss, mean of the first → last tenth of steps",
         f"{m.get('first_tenth_mean_loss')} → {m.get('last_tenth_mean_loss')}"),
        ("peak memory", memory),
    ]
    if m.get("final_eval_loss") is not None:
        rows.append(("held-out loss at the end", round(m["final_eval_loss"], 4)))
    versions = record.get("environment", {}).get("versions", {})
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    return rows


def _evaluation(evaluation: dict[str, Any]) -> str:
    rows = ["| metric | base | tuned |", "|---|---|---|"]
    for key, label, digits in EVAL_METRICS:
        base, tuned = evaluation.get("base", {}).get(key), evaluation.get("tuned", {}).get(key)
        if base is not None or tuned is not None:
            rows.append(f"| {label} | {_round(base, digits)} | {_round(tuned, digits)} |")
    return (f"## Evaluation\n\nOn {evaluation.get('rows', '?')} held-out rows, base model (adapter off) against the "
            "tuned model: loss and perplexity of the preferred responses, how often the preferred response is more "
            "likely than the rejected one, and the mean margin.\n\n" + "\n".join(rows))


def _prompt_code(p: dict[str, Any]) -> str:
    """Python that builds the prompt exactly as in training: the Alpaca text, or the chat template with the
    system prompt and the empty think block."""
    if p["prompt_template"] == "alpaca":
        return f"prompt = {json.dumps(format_generation_prompt('alpaca', CHECK_PROMPT), ensure_ascii=False)}"
    system = [{"role": "system", "content": p["system_prompt"]}] if p.get("system_prompt") else []
    messages = json.dumps([*system, {"role": "user", "content": CHECK_PROMPT}], ensure_ascii=False)
    return (f"messages = {messages}\n"
            "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
            "# the empty think block the model was trained with (only for templates that use one)\n"
            "prompt += \"\\n</think>\\n\\n\" if prompt.endswith(\"<think>\\n\") else \"<think>\\n\\n</think>\\n\\n\"")


def _usage(p: dict[str, Any], export_format: str, source: str, gguf_files: list[str]) -> str:
    prompt = _prompt_code(p)
    generate = ("inputs = tokenizer([prompt], return_tensors=\"pt\").to(model.device)\n"
                "output = model.generate(**inputs, max_new_tokens=256, do_sample=False)\n"
                "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
    intro = f"The model was trained on prompts in the {p['prompt_template']} template; ask in the same form."
    if export_format == "lora":
        note = (f"\n\nThe base model `{p['model_name']}` is a local folder: it must be present at that path."
                if is_local_path(p["model_name"]) else "")
        code = ("from unsloth import FastLanguageModel\n\n"
                f"model, tokenizer = FastLanguageModel.from_pretrained(\"{source}\", "
                f"max_seq_length={p['max_seq_length']}, load_in_4bit={p['load_in_4bit']})\n"
                "FastLanguageModel.for_inference(model)\n")
        return f"{intro}{note}\n\n```python\n{code}{prompt}\n{generate}\n```"
    if export_format in ("merged_16bit", "merged_4bit"):
        needs = " (needs `bitsandbytes` and a CUDA GPU)" if export_format == "merged_4bit" else ""
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{source}\")\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{source}\", dtype=\"auto\", device_map=\"auto\")\n")
        return f"{intro}{needs}\n\n```python\n{code}{prompt}\n{generate}\n```"
    file = gguf_files[0] if gguf_files else "<file>.gguf"
    # -no-cnv: the raw Alpaca text, not the chat template the file carries from the base tokenizer
    ask = (f"-no-cnv -p {json.dumps(format_generation_prompt('alpaca', CHECK_PROMPT), ensure_ascii=False)}"
           if p["prompt_template"] == "alpaca" else "--jinja -cnv  # chat in the model's own template")
    fetch = ("in this folder, " if is_local_path(source) else
             f"`huggingface-cli download {source} --local-dir {_title(source)}`, then in that folder ")
    model = f"-m {file}"
    if export_format == "gguf_lora":
        intro += (f" This is the adapter alone: it runs on a GGUF of the base model `{p['model_name']}` (for a "
                  "pre-quantized 4-bit base, its 16-bit original: the adapter was trained on top of those weights). "
                  "The `Modelfile` names the base GGUF it was checked on and, for a known base, a published one.")
        model = f"-m <base model>.gguf --lora {file}"
    return (f"{intro}\n\nWith llama.cpp:\n\n```bash\nllama-cli {model} -n 256 {ask}\n```\n\n"
            f"With Ollama: the `Modelfile` beside the file wraps each message in the template the model was trained "
            f"with and stops at its EOS; {fetch}`ollama create my-model -f Modelfile`, then `ollama run my-model`.")


def _title(source: str) -> str:
    """The repository name, or for a local export (run_dir/export/<format>) the run's folder name."""
    return Path(source).parent.parent.name if is_local_path(source) else source.split("/")[1]


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, float) else ("" if value is None else value)
