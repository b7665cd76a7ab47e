"""Loss curves, drawn for the notebook and saved beside the run."""
from __future__ import annotations

from pathlib import Path

from helpers.records import read_train_log, save_figure


def plot_loss(run_dir: str | Path, title: str | None = None):
    """Draw run_dir/train_log.csv as a loss curve (for a DPO run beside its reward accuracy and margin), save it
    as run_dir/loss.png, and return the figure."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = read_train_log(run_dir / "train_log.csv")
    rows = [r for r in log if r["loss"] is not None]
    evals = [r for r in log if r.get("eval_loss") is not None]
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    rewards = [name for name in ("accuracies", "margins") if any(r.get(f"rewards/{name}") is not None for r in log)]
    fig, axes = plt.subplots(1, 1 + len(rewards), figsize=(8 + 4.5 * len(rewards), 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, losses, marker="." if len(rows) < 60 else None, label="training loss")
    if len(rows) >= 10:
        half = max(1, len(rows) // 20)  # centred window: follows the curve without lagging behind it
        smooth = moving_average(losses, before=half, after=half)
        ax.plot(steps, smooth, linewidth=2, label=f"moving average ({2 * half + 1} steps)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", linewidth=2,
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or f"Training loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    for reward_ax, name in zip(axes[0][1:], rewards):
        _plot_reward(reward_ax, log, name)
    fig.tight_layout()
    save_figure(fig, run_dir / "loss.png")
    plt.close(fig)
    return fig



def _plot_reward(ax, log, name: str) -> None:
    """DPO's implicit-reward accuracy or margin (chosen against rejected), training and held-out."""
    for prefix, label, style in (("", "training", {}), ("eval_", "held-out", {"marker": "o", "linewidth": 2})):
        points = [(r["step"], r[f"{prefix}rewards/{name}"]) for r in log if r.get(f"{prefix}rewards/{name}") is not None]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_title({"accuracies": "reward accuracy: chosen ranked above rejected",
                  "margins": "reward margin: chosen minus rejected"}[name])
    ax.grid(alpha=0.3)
    ax.legend()


def moving_average(values, before: int, after: int = 0) -> list[float]:
    """Each value averaged with up to `before` values before it and `after` after it (fewer at the ends)."""
    windows = [values[max(0, i - before): i + after + 1] for i in range(len(values))]
    return [sum(window) / len(window) for window in windows]
