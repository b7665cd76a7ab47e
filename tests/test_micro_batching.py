"""micro_batching: the recipe's rows per optimizer step in fewer, larger micro-batches is the same optimization."""
from __future__ import annotations

import pytest

from helpers.config import RunConfig
from helpers.micro_batching import micro_batch_rows
from helpers.records import read_json, read_train_log

# Largest relative difference between recipe (2 x 4) and auto (8 x 1) over the 4 fp32 steps of SmolLM2-135M-Instruct
# below (rows of 1 to 48 words, loss on responses only), measured 2026-12-07 on the CPU (2 threads): loss 1.0e-7,
# grad norm 2.2e-7 (float rounding of sums taken in another order; 20 steps of rows cut to 48 tokens gave 4.1e-7 and
# 1.7e-6 on 2026-11-30). 1e-4 leaves room for another CPU and thread count and stays far below what another
# normalization moves: a loss averaged per micro-batch differed from auto's by 1.1% to 44% in loss and 8.5% to 93%
# in grad norm at each of the 4 steps.
RELATIVE_TOLERANCE = 1e-4


@pytest.mark.parametrize("budget, expected", [(None, 8), (10 * 2048, 8), (4 * 2048, 4), (3 * 2048, 2), (0, 2)])
def test_auto_picks_the_largest_divisor_of_the_step_that_fits(budget, expected):
    assert micro_batch_rows(8, 2, 2048, budget) == expected


class _Shape8B:
    """The 8B shape's config, as decide() reads it from a loaded model."""

    class config:  # noqa: N801
        @staticmethod
        def get_text_config():
            return type("TextConfig", (), {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32})


@pytest.mark.parametrize("free_gib, longest, expected", [
    (7.6, 167, (8, 1, True)),  # the sample's rows: one micro-batch, its checkpoints fit on the GPU too
    (7.6, 2048, (8, 1, False)),  # 8 rows of 2,048 tokens fit as one micro-batch, their checkpoints do not
    (3.0, 2048, (2, 4, False)),  # less room: the recipe's micro-batches
])
def test_auto_plans_micro_batches_and_checkpoints_by_the_gpu_memory_left(monkeypatch, free_gib, longest, expected):
    from helpers import micro_batching

    monkeypatch.setattr(micro_batching, "free_gpu_bytes", lambda model, config: free_gib * 2**30)
    computed = micro_batching.decide(RunConfig(), 2, 4, _Shape8B(), longest)
    assert (computed.rows, computed.accumulation, computed.resident_checkpoints) == expected
    assert computed.flash_attention and computed.gradient_checkpointing == (True if expected[2] else "unsloth")
    assert computed.keep_layers == expected[2]  # layers kept un-checkpointed only beside checkpoints on the GPU


def test_recipe_and_the_cpu_compute_as_the_tutorial_does(monkeypatch):
    from helpers import micro_batching

    monkeypatch.setattr(micro_batching, "free_gpu_bytes", lambda model, config: None)  # no GPU
    assert micro_batching.decide(RunConfig(), 2, 4, _Shape8B(), 2048) == micro_batching.MicroBatching(8, 1)
    recipe = RunConfig(micro_batching="recipe")
    assert micro_batching.decide(recipe, 2, 4, _Shape8B(), 167) == micro_batching.MicroBatching(2, 4)
    assert micro_batching.MicroBatching(2, 4).gradient_checkpointing == "unsloth"


GIB = 2**30


class _Layer:
    def __init__(self, checkpointed: bool = True):
        self.gradient_checkpointing = checkpointed

    def register_forward_pre_hook(self, hook):
        return type("Handle", (), {"remove": lambda self: None})()


class _Forward:
    """What the hook reads of a forward call: the module's training flag and the input ids' shape."""

    training = True

    def __init__(self, keeper):
        self.keeper = keeper

    def __call__(self, tokens: int, rows: int = 1) -> int:
        import torch

        self.keeper.before_forward(self, (), {"input_ids": torch.zeros(rows, tokens // rows, dtype=torch.long)})
        return self.keeper.counts[-1] if self.keeper.counts else None


def _keeper(peak_gib: float):
    """32 layers, a 15 GiB limit with 7 GiB allocated at every micro-batch's start, 0.5 GiB of gradients, 128 KiB a
    token for a kept layer; the first micro-batch peaked at peak_gib."""
    from helpers.micro_batching import KeptLayers

    return KeptLayers([_Layer() for _ in range(32)] + [_Layer(checkpointed=False)], lambda: 15 * GIB, lambda: 7 * GIB,
                      lambda: peak_gib * GIB, GIB // 2, 128 * 2**10)  # one more layer, not checkpointed: left alone


def test_kept_layers_are_as_many_as_the_memory_left_holds():
    # first micro-batch (2,048 tokens, all checkpointed): peak 7.75 GiB = start 7 + gradients 0.5 + 0.25 for the
    # rest, i.e. 0.25 GiB / 2,048 tokens besides kept layers. A later 2,048-token micro-batch: room 15 - 1 (margin) -
    # 7 - 0.5 - 0.25 = 6.25 GiB over 2,048 x 128 KiB = 0.25 GiB a layer: 25 layers.
    forward = _Forward(_keeper(peak_gib=7.75))
    unarmed = forward.keeper.layers[-1]
    assert forward(2048) == 0
    assert forward(2048) == 25
    assert [layer.gradient_checkpointing for layer in forward.keeper.layers] == [False] * 25 + [True] * 7
    # 4,096 tokens: 15 - 1 - 7 - 0.5 - 0.5 = 6 GiB over 0.5 GiB a layer; 512 tokens: all 32 fit; 32,768: 2.5 GiB
    # over 4 GiB a layer, none
    assert forward(4096, rows=8) == 12
    assert forward(512) == 32
    assert forward(32768) == 0
    assert all(layer.gradient_checkpointing for layer in forward.keeper.layers)
    assert forward.keeper.record() == {"layers": 32, "micro_batches": 5, "min": 0, "mean": 13.8, "max": 32,
                                       "ran_once": {"min": 0, "mean": 0.0, "max": 0},  # no layer ran here
                                       "forward_calls_per_kept_layer": 0.0}
    forward.keeper.handle = type("Handle", (), {"remove": lambda self: None})()
    forward(2048)
    forward.keeper.remove()
    assert all(layer.gradient_checkpointing for layer in forward.keeper.layers)
    assert unarmed not in forward.keeper.layers and unarmed.gradient_checkpointing is False


def test_kept_layers_leave_evaluation_and_the_first_step_alone():
    forward = _Forward(_keeper(peak_gib=14.5))  # a first micro-batch that took almost everything: nothing to keep
    forward.training = False
    assert forward(2048) is None and forward.keeper.first is None  # evaluation: no count, nothing measured
    forward.training = True
    assert [forward(2048), forward(2048)] == [0, 0]


def test_kept_layers_run_once_and_give_the_checkpointed_gradients(tmp_path):
    """On the tiny model with LoRA and gradient checkpointing (unsloth, CPU): a layer kept runs its forward once per
    micro-batch, a checkpointed one twice (the recompute in the backward), and the gradients are the same."""
    import torch

    import helpers.stack  # noqa: F401
    from helpers import modeling
    from helpers.micro_batching import KeptLayers, decoder_layers
    from helpers.local_models import build_tiny_model

    config = RunConfig(model_name=str(build_tiny_model(tmp_path / "tiny")), load_in_4bit=False, precision="fp32",
                       max_seq_length=64, lora_r=4, lora_alpha=8, run_dir=str(tmp_path / "run"))
    model = modeling.add_lora(modeling.load_base_model(config, "fp32")[0], config, True)
    model.train()
    layers = decoder_layers(model)
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    # nothing used by the first micro-batch; a kept layer takes 1 MiB at 32 tokens; room beside the margin for all
    # layers but one
    keeper = KeptLayers(layers, lambda: (len(layers) - 1) * 2**20 + 2**30, lambda: 0, lambda: 0, 0, 2**20 / 32)
    keeper.handle = model.register_forward_pre_hook(keeper.before_forward, with_kwargs=True)
    ids = torch.randint(5, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(2):
        calls[:] = [0] * len(layers)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
        if len(grads) == 1:
            assert calls == [2] * len(layers)  # first micro-batch: every layer checkpointed, recomputed
    keeper.remove()
    assert keeper.counts == [0, len(layers) - 1]
    assert calls == [1] * (len(layers) - 1) + [2]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7 * grad.abs().max().item(), msg=name)
    # What it records is what ran: each kept layer's forward once in the second micro-batch.
    assert keeper.record()["ran_once"] == {"min": 0, "mean": (len(layers) - 1) / 2, "max": len(layers) - 1}
    assert keeper.record()["forward_calls_per_kept_layer"] == 1.0


def test_kept_layers_record_a_keep_that_had_no_effect(tmp_path, caplog):
    """Where something turns checkpointing back on after KeptLayers chose (as a stack that ignores the layer's flag
    would), the kept layers run twice, and the record and a warning say so."""
    import torch

    import helpers.stack  # noqa: F401
    from helpers import modeling
    from helpers.micro_batching import KeptLayers, decoder_layers
    from helpers.local_models import build_tiny_model

    config = RunConfig(model_name=str(build_tiny_model(tmp_path / "tiny")), load_in_4bit=False, precision="fp32",
                       max_seq_length=64, lora_r=4, lora_alpha=8, run_dir=str(tmp_path / "run"))
    model = modeling.add_lora(modeling.load_base_model(config, "fp32")[0], config, True)
    model.train()
    layers = decoder_layers(model)
    keeper = KeptLayers(layers, lambda: len(layers) * 2**20 + 2**30, lambda: 0, lambda: 0, 0, 2**20 / 32)
    keeper.handle = model.register_forward_pre_hook(keeper.before_forward, with_kwargs=True)

    def checkpoint_every_layer(module, args):
        for layer in layers:
            layer.gradient_checkpointing = True

    undo = model.register_forward_pre_hook(checkpoint_every_layer)
    ids = torch.randint(5, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    undo.remove()
    with caplog.at_level("WARNING", logger="helpers.micro_batching"):
        keeper.remove()
    assert keeper.counts == [0, len(layers)]  # asked to keep every layer in the second micro-batch...
    assert keeper.record()["ran_once"]["max"] == 0 and keeper.record()["forward_calls_per_kept_layer"] == 2.0
    assert f"{len(layers)} of {len(layers)} kept layer passes ran twice" in caplog.text


def test_micro_batching_is_validated():
    with pytest.raises(ValueError, match="micro_batching 'fast' is unknown; choose one of: auto, recipe"):
        RunConfig(micro_batching="fast")


def _varied_rows(path):
    """32 rows whose responses run from 1 to 48 words (from the sample's answers): with the loss on responses only,
    each of the recipe's micro-batches holds another number of label tokens."""
    import json

    from helpers.data import SAMPLE_DATASET, read_local_rows

    sample = read_local_rows(SAMPLE_DATASET)
    words = " ".join(row["chosen"] for row in sample).split()
    lengths = [1, 48, 3, 30, 2, 40, 8, 20, 2, 44, 12, 4, 36, 1, 24, 6] * 2
    rows = [{"prompt": row["prompt"], "chosen": " ".join(words[i * 7:i * 7 + n]), "rejected": row["rejected"]}
            for i, (row, n) in enumerate(zip(sample, lengths))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _train(folder, dataset, micro_batching, per_micro_batch_mean=False):
    """4 steps of SmolLM2-135M-Instruct (a real pretrained model, fp32, in its chat template, loss on responses only)
    with the recipe's 2 x 4 rows per step; with per_micro_batch_mean, each micro-batch's loss is its own mean (the
    trainer not told the step's label tokens), as gradient accumulation computed it before transformers fixed it."""
    import helpers.stack  # noqa: F401
    from helpers import trainers
    from helpers.fine_tuning import run_training
    from helpers.local_models import SMOLLM2_MODEL_DIR, build_smollm2
    from helpers.paths import PROJECT_ROOT
    from helpers.project import load_profile

    model = build_smollm2(PROJECT_ROOT / SMOLLM2_MODEL_DIR)
    run_dir = folder / (micro_batching + ("-per-micro-batch-mean" if per_micro_batch_mean else ""))
    config = RunConfig.from_dict({**load_profile("cpu_smollm2"), "model_name": str(model), "dataset": str(dataset),
                                  "run_dir": str(run_dir), "max_steps": 4, "micro_batching": micro_batching,
                                  "eval_fraction": 0.0, "save_steps": 100, "per_device_train_batch_size": 2,
                                  "gradient_accumulation_steps": 4, "train_on_responses_only": True})
    with pytest.MonkeyPatch.context() as patch:
        if per_micro_batch_mean:
            build = trainers.build_trainer

            def without_the_steps_label_count(*args, **kwargs):
                trainer = build(*args, **kwargs)
                batches = trainer.get_batch_samples
                trainer.get_batch_samples = lambda *a, **k: (batches(*a, **k)[0], None)
                return trainer

            patch.setattr(trainers, "build_trainer", without_the_steps_label_count)
        run_training(config)
    return read_train_log(run_dir / "train_log.csv"), read_json(run_dir / "run.json")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """(recipe, auto, recipe with a per-micro-batch mean): each (train_log rows, run.json), trained once."""
    folder = tmp_path_factory.mktemp("micro-batching")
    dataset = _varied_rows(folder / "varied.jsonl")
    return (_train(folder, dataset, "recipe"), _train(folder, dataset, "auto"),
            _train(folder, dataset, "recipe", per_micro_batch_mean=True))


def _differences(log, reference):
    """(step, column, relative difference) wherever log departs from reference by more than RELATIVE_TOLERANCE."""
    return [(a["step"], column, abs(b[column] - a[column]) / abs(a[column]))
            for a, b in zip(reference, log) for column in ("loss", "grad_norm")
            if b[column] != pytest.approx(a[column], rel=RELATIVE_TOLERANCE)]


@pytest.mark.real_model
def test_auto_trains_the_recipe_step_for_step_on_rows_of_varied_lengths(three_runs):
    (recipe_log, recipe), (auto_log, auto), _ = three_runs
    assert recipe["distributed"]["per_device_train_batch_size"] == 2
    assert recipe["distributed"]["gradient_accumulation_steps"] == 4
    assert auto["distributed"]["per_device_train_batch_size"] == 8
    assert auto["distributed"]["gradient_accumulation_steps"] == 1
    assert auto["parameters"]["micro_batching"] == "auto"
    assert len(recipe_log) == len(auto_log) == 4
    assert recipe["metrics"]["trained_tokens"] == auto["metrics"]["trained_tokens"]
    assert _differences(auto_log, recipe_log) == []


@pytest.mark.real_model
def test_the_same_comparison_catches_a_loss_averaged_per_micro_batch(three_runs):
    _, (auto_log, _), (wrong_log, wrong) = three_runs
    assert wrong["distributed"]["gradient_accumulation_steps"] == 4
    differences = _differences(wrong_log, auto_log)
    assert {column for _, column, _ in differences} == {"loss", "grad_norm"}, differences


def test_the_in_training_eval_loss_is_the_same_however_the_rows_are_batched(tmp_path):
    """eval_loss is the mean loss of the held-out rows' label tokens: evaluated in batches of 1, 2 or 8 rows (the
    recipe's micro-batches and auto's), the same number. transformers alone averages each batch's own mean, weighted
    by rows, which made `auto`'s eval_loss differ from the recipe's for the same model (7.313 against 7.218 at real
    scale, docs/real-scale.md)."""
    import helpers.stack  # noqa: F401
    from helpers import data, fine_tuning, modeling, trainers
    from helpers.local_models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model")
    config = RunConfig(model_name=str(model_dir), dataset=str(_varied_rows(tmp_path / "varied.jsonl")),
                       load_in_4bit=False, precision="fp32", max_seq_length=128, lora_r=4, lora_alpha=8,
                       max_steps=1, optim="adamw_torch", train_on_responses_only=True, run_dir=str(tmp_path / "run"))
    precision = fine_tuning.prepare_run(config)
    rows = data.load_checked_rows(config)
    model, tokenizer = modeling.load_base_model(config, precision)
    model = modeling.add_lora(model, config)
    eval_set = data.to_training_set(rows[:12], config, tokenizer)
    trainer = trainers.build_trainer(model, tokenizer, data.to_training_set(rows[12:], config, tokenizer), config,
                                     precision, eval_set)
    losses = {}
    for rows_per_batch in (1, 2, 8):
        trainer.args.per_device_eval_batch_size = rows_per_batch
        losses[rows_per_batch] = trainer.evaluate()["eval_loss"]
    assert losses[2] == pytest.approx(losses[1], rel=1e-5), losses
    assert losses[8] == pytest.approx(losses[1], rel=1e-5), losses
