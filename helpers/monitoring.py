"""Watching a run: the loss curve redrawn in place while a person watches, with time left and GPU memory; the
speed once warmed up; how training's time divides between steps, evaluation and checkpoints; a stop with advice at
the first non-finite loss."""
from __future__ import annotations

import math
import time
from pathlib import Path

import helpers.stack  # noqa: F401  (unsloth before transformers)
from transformers import TrainerCallback

from helpers.environment import gpu_total_gib, peak_memory
from helpers.records import latest_checkpoint


def should_redraw(interactive: bool, step: int, every: int, last_step: int) -> bool:
    """Redraw only for a watcher (never headless), every `every` steps, and always on the last step."""
    return interactive and step > 0 and (step % every == 0 or step == last_step)


def gpu_memory_gib() -> tuple[float, float] | None:
    """(peak reserved, total) GiB of GPU memory, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_reserved() / 2**30, gpu_total_gib()


def memory_label(gpu: tuple[float, float] | None, peak_rss_gib: float) -> str:
    """'GPU 7.4/15.0 GiB' (peak reserved / total) with CUDA, else 'RAM 1.0 GiB peak' (this process's peak RSS)."""
    return f"GPU {gpu[0]:.1f}/{gpu[1]:.1f} GiB" if gpu is not None else f"RAM {peak_rss_gib:.1f} GiB peak"


def progress_title(step: int, max_steps: int, elapsed: float, memory: str) -> str:
    """'step 40/120 · 0:01:10 elapsed · 0:02:20 left · GPU 7.4/15.0 GiB' (time left from the pace so far)."""
    left = elapsed / step * (max_steps - step) if step else 0.0
    clock = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))  # noqa: E731
    return " · ".join([f"step {step}/{max_steps}", f"{clock(elapsed)} elapsed", f"{clock(left)} left", memory])


class LiveLossPlot(TrainerCallback):
    """Collects every logged loss; in an interactive notebook redraws the curve in place every few logs."""

    def __init__(self, interactive: bool, every: int = 5):
        self.interactive, self.every = interactive, every
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.eval_points: list[tuple[int, float]] = []
        self.redraws = 0
        self._handle = None
        self._started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            self.eval_points.append((state.global_step, logs["eval_loss"]))
        if not logs or "loss" not in logs:
            return
        self.steps.append(state.global_step)
        self.losses.append(logs["loss"])
        if should_redraw(self.interactive, state.global_step, self.every * args.logging_steps, state.max_steps):
            self._redraw(state.global_step, state.max_steps)

    def _redraw(self, step: int, max_steps: int) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(self.steps, self.losses, label="training loss")
        if self.eval_points:
            ax.plot(*zip(*self.eval_points), marker="o", label="held-out loss")
        ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        memory = memory_label(gpu_memory_gib(), peak_memory()["peak_rss_gib"])
        ax.set_title(progress_title(step, max_steps, time.perf_counter() - self._started, memory))
        ax.grid(alpha=0.3)
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)
        self.redraws += 1


class StepClock(TrainerCallback):
    """Wall time and tokens seen at the end of every optimizer step, for the speed once warmed up (the first
    steps compile kernels and fill caches)."""

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self.marks: list[tuple[int, float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    def steady_speed(self) -> dict[str, float]:
        """Seconds per step and trained tokens per second after the warm-up steps (all processes' tokens); empty
        when the run had no step past them."""
        if len(self.marks) <= self.warmup_steps + 1:
            return {}
        (step0, time0, tokens0), (step1, time1, tokens1) = self.marks[self.warmup_steps], self.marks[-1]
        return {"steady_s_per_step": round((time1 - time0) / (step1 - step0), 4),
                "steady_tokens_per_s": round((tokens1 - tokens0) / (time1 - time0), 1)}


class TrainingStages(TrainerCallback):
    """How trainer.train's wall time divides: the in-training evaluations (the Trainer's own eval_runtime) and the
    checkpoint saves (from the last event before a save to the save's end); the rest is the training steps."""

    def __init__(self):
        self.evaluation = 0.0
        self.checkpoints = 0.0
        self._last = time.perf_counter()

    def _mark(self, *args, **kwargs):
        self._last = time.perf_counter()

    on_train_begin = on_step_end = on_log = _mark

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluation += (metrics or {}).get("eval_runtime", 0.0)
        self._last = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.checkpoints += time.perf_counter() - self._last
        self._last = time.perf_counter()

    def split(self, train_seconds: float) -> dict[str, float]:
        """{'training steps', 'in-training evaluation', 'checkpoints'} seconds of a train() that took train_seconds."""
        return {"training steps": train_seconds - self.evaluation - self.checkpoints,
                "in-training evaluation": self.evaluation, "checkpoints": self.checkpoints}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN or infinite loss, before it is checkpointed, with settings to try."""

    def __init__(self, config):
        self.config = config

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            checkpoint = latest_checkpoint(Path(self.config.run_dir) / "checkpoints")
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"the training loss became {loss} at step {state.global_step}; {kept}. Try a lower learning_rate "
                f"(now {self.config.learning_rate}), more warmup_steps (now {self.config.warmup_steps}), or "
                "precision='bf16' / 'fp32' instead of fp16; then run again (resume='auto' continues from the "
                "last checkpoint)")
