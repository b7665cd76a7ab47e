"""Watching a run: when the live plot redraws, what it records, and TensorBoard logs."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from helpers.monitoring import LiveLossPlot, memory_label, progress_title, should_redraw


@pytest.mark.parametrize("step", range(0, 13))
def test_headless_never_redraws(step):
    assert not should_redraw(False, step, every=5, last_step=12)


def test_interactive_redraws_every_few_steps_and_at_the_end():
    assert [s for s in range(13) if should_redraw(True, s, every=5, last_step=12)] == [5, 10, 12]


def test_progress_title_says_step_time_left_and_memory():
    title = progress_title(30, 120, elapsed=60.0, memory=memory_label((7.4, 15.0), peak_rss_gib=2.0))
    assert title == "step 30/120 · 00:01:00 elapsed · 00:03:00 left · GPU 7.4/15.0 GiB"
    assert progress_title(30, 120, 60.0, memory_label(None, peak_rss_gib=1.04)).endswith("left · RAM 1.0 GiB peak")


def _log(callback, steps, interactive_args):
    for step in steps:
        state = SimpleNamespace(global_step=step, max_steps=steps[-1])
        callback.on_log(interactive_args, state, None, logs={"loss": 10.0 / step, "learning_rate": 1e-4})
        callback.on_log(interactive_args, state, None, logs={"train_runtime": 1.0})  # a summary, not a loss


def test_live_plot_records_every_loss_and_redraws_only_when_watched(capsys):
    args = SimpleNamespace(logging_steps=1)
    headless = LiveLossPlot(interactive=False, every=5)
    _log(headless, list(range(1, 13)), args)
    assert headless.steps == list(range(1, 13)) and headless.redraws == 0
    assert headless.losses == [pytest.approx(10.0 / s) for s in range(1, 13)]
    watched = LiveLossPlot(interactive=True, every=5)
    _log(watched, list(range(1, 13)), args)
    assert watched.redraws == 3 and all(math.isfinite(x) for x in watched.losses)


def test_tensorboard_writes_event_files(tmp_path):
    import helpers.stack  # noqa: F401
    from helpers import data, fine_tuning, modeling, trainers
    from helpers.config import RunConfig
    from helpers.local_models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model")
    config = RunConfig(model_name=str(model_dir), dataset=str(data.SAMPLE_DATASET), load_in_4bit=False,
                       precision="fp32", max_seq_length=128, lora_r=4, lora_alpha=8, max_steps=4,
                       optim="adamw_torch", report_to="tensorboard", run_dir=str(tmp_path / "run"))
    precision = fine_tuning.prepare_run(config)
    rows = data.load_checked_rows(config)[:32]
    model, tokenizer = modeling.load_base_model(config, precision)
    model = modeling.add_lora(model, config)
    trainer = trainers.build_trainer(model, tokenizer, data.to_training_set(rows, config, tokenizer), config, precision)
    fine_tuning.train_and_record(trainer, model, tokenizer, config)
    events = list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_step_clock_measures_speed_after_the_warm_up_steps(monkeypatch):
    from types import SimpleNamespace

    from helpers import monitoring

    clock = monitoring.StepClock(warmup_steps=2)
    assert clock.steady_speed() == {}
    times = iter([10.0, 30.0, 31.0, 32.0, 33.0])  # two slow warm-up steps, then 1 s a step
    monkeypatch.setattr(monitoring.time, "perf_counter", lambda: next(times))
    for step, tokens in enumerate([100, 200, 300, 400, 500], start=1):
        clock.on_step_end(None, SimpleNamespace(global_step=step, num_input_tokens_seen=tokens), None)
    assert clock.steady_speed() == {"steady_s_per_step": 1.0, "steady_tokens_per_s": 100.0}

