"""Before and after: the base model (adapter disabled) and the tuned model on the held-out rows, side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers.environment import peak_memory, reset_peak_memory
from helpers.evaluation import evaluate_model
from helpers.inference import generate_batch
from helpers.records import atomic_write_text, save_figure, write_json
from helpers.timing import recorded

METRICS = ("loss", "perplexity", "preference_accuracy", "mean_margin")


def compared_runs(config) -> list[str]:
    """The other runs to score on this run's held-out rows: compare_runs, or else the SFT run a DPO run continued;
    each named by its path (two runs in folders named alike stay apart)."""
    runs = [str(Path(run)) for run in config.compare_runs] or ([str(Path(config.sft_run_dir))] if config.sft_run_dir
                                                               else [])
    repeated = sorted({run for run in runs if runs.count(run) > 1})
    if repeated:
        raise ValueError(f"compare_runs names {', '.join(map(repr, repeated))} more than once; name each run once")
    for run in runs:
        if not (Path(run) / "adapter").is_dir():
            raise FileNotFoundError(f"compare_runs: {run!r} holds no trained adapter ({run}/adapter is missing)")
    return runs


# Scoring batches: rows of similar length together (longest first), as many as fit this many tokens, at most
# SCORING_ROWS of them. 8,192 tokens of a 128k vocabulary take 4 GiB of fp32 logits, beside an 8B model in 4-bit on
# a T4.
SCORING_TOKENS = 8192
SCORING_ROWS = 64


def scoring_batch_tokens(config) -> int:
    """Tokens a scoring batch may hold: SCORING_TOKENS, or less where the training step held less (rows x
    max_seq_length)."""
    return min(SCORING_TOKENS, config.per_device_train_batch_size * config.gradient_accumulation_steps
               * config.max_seq_length)


@recorded("held-out rows scored")
def evaluate_run(model, tokenizer, config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out metrics of the base model (adapter disabled, same weights), of each compared run (its adapter
    loaded beside this run's, the base weights shared) and of the tuned model."""
    rows = rows[: config.max_eval_rows]
    kwargs = dict(template=config.prompt_template, rows=rows, prompt_field=config.prompt_field,
                  response_field=config.response_field, rejected_field=config.rejected_field,
                  batch_size=SCORING_ROWS, batch_tokens=scoring_batch_tokens(config),
                  max_length=config.max_seq_length, system_prompt=config.system_prompt)
    reset_peak_memory()
    with model.disable_adapter():
        base = evaluate_model(model, tokenizer, **kwargs)
    compared = {}
    for number, run in enumerate(compared_runs(config)):
        name = f"compared_{number}"
        model.load_adapter(str(Path(run) / "adapter"), adapter_name=name)
        model.set_adapter(name)
        compared[run] = evaluate_model(model, tokenizer, **kwargs)
        model.set_adapter("default")
        model.delete_adapter(name)
    tuned = evaluate_model(model, tokenizer, **kwargs)
    return {"rows": len(rows), "response_field": config.response_field, "rejected_field": config.rejected_field,
            "run": str(Path(config.run_dir)), "base": base, "compared": compared, "tuned": tuned,
            "memory": peak_memory()}


def _columns(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, metrics) of each model scored: base, the compared runs, then this run; each run labelled by the
    shortest end of its path that tells it from the others (its folder name, unless two are named alike)."""
    runs = [*results["compared"], results["run"]]
    parts = [Path(run).parts for run in runs]
    labels = next((ends for depth in range(1, max(map(len, parts)) + 1)
                   if len(set(ends := ["/".join(p[-depth:]) for p in parts])) == len(runs)), runs)
    return [("base", results["base"]), *zip(labels, [*results["compared"].values(), results["tuned"]])]


@recorded("side-by-side answers")
def side_by_side(model, tokenizer, config) -> list[dict[str, str]]:
    """Greedy answers to each prompt from the base model and from the tuned model, each model's in one batch."""
    args = (config.prompts, config.prompt_template, config.max_new_tokens, 0.0, config.system_prompt)
    with model.disable_adapter():
        base = generate_batch(model, tokenizer, *args)
    tuned = generate_batch(model, tokenizer, *args)
    return [{"prompt": prompt, "base": b, "tuned": t} for prompt, b, t in zip(config.prompts, base, tuned)]


def report_markdown(results: dict[str, Any], generations: list[dict[str, str]]) -> str:
    """eval.md: the metrics table, one column per model scored, then the generations side by side."""
    columns = _columns(results)
    lines = [f"# Held-out evaluation ({results['rows']} rows)", "",
             "| metric | " + " | ".join(label for label, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in METRICS:
        if all(metric in scores for _, scores in columns):
            lines.append(f"| {metric} | " + " | ".join(f"{scores[metric]:.4f}" for _, scores in columns) + " |")
    if "note" in results["tuned"]:
        lines += ["", f"Note: {results['tuned']['note']}"]
    lines += ["", "## Generations (greedy)", "", "| prompt | base | tuned |", "|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines += [f"| {cell(g['prompt'])} | {cell(g['base'])} | {cell(g['tuned'])} |" for g in generations]
    return "\n".join(lines) + "\n"


def save_report(run_dir: str | Path, results: dict[str, Any], generations: list[dict[str, str]]) -> str:
    """Write eval.json and eval.md into run_dir; return the Markdown."""
    write_json(Path(run_dir) / "eval.json", {**results, "generations": generations})
    markdown = report_markdown(results, generations)
    atomic_write_text(Path(run_dir) / "eval.md", markdown)
    return markdown


def plot_comparison(run_dir: str | Path, results: dict[str, Any]):
    """Bar charts of each held-out metric, one bar per model scored (base, compared runs, this run); saved as
    run_dir/eval.png."""
    import matplotlib.pyplot as plt

    columns = _columns(results)
    metrics = [m for m in ("loss", "preference_accuracy", "mean_margin") if all(m in s for _, s in columns)]
    colors = ["#999999", *["#8fb8d8"] * (len(columns) - 2), "#2a7ab9"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4, 1.3 * len(columns)) * len(metrics), 3.5),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.bar([label for label, _ in columns], [scores[metric] for _, scores in columns], color=colors)
        ax.set_title(metric.replace("_", " "))
        ax.bar_label(ax.containers[0], fmt="%.3f")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"Held-out evaluation, {results['rows']} rows")
    fig.tight_layout()
    save_figure(fig, Path(run_dir) / "eval.png")
    plt.close(fig)
    return fig
