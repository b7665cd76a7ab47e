"""Rows shaped like the dataset of record, HumanLLMs/Human-Like-DPO-Dataset, for timing every stage of a run at its
real scale offline: 10,884 rows of `prompt`, `chosen` and `rejected` by default, whose word counts follow the real
data's, and whose text is sentences of the bundled sample (helpers/data/sample_dpo.jsonl, written for this project),
so that tokenizers see English with emoji as in the real data. The meaning of the text is not the point: its length
is.

Where the lengths come from (measured 2026-12-06). The Hub's `data.json` (28 MB, 10,884 rows) is the concatenation of
six source files of the dataset's repository. Four of them were read in a public mirror (7,162 rows: part1, part2 and
the two "more casual convs" files): their word counts (whitespace-separated) give the quantiles below. The other two
(`dpo_dataset_4_09_2024_2k.json`, `dpo_dataset_16_09_2024_more_info_convs_2k.json`, 3,722 rows together) could not be
read; their 16.41 MB make 4,409 bytes a row against 1,625 for the four read (the same JSON layout), i.e. answers
about 2.84 times as long, prompts alike. So a row is drawn from the measured quantiles with probability 7,162 /
10,884 and otherwise from the same quantiles with both answers 2.84 times as long. That component is an estimate
from file sizes, not a measurement; the bundled sample's answers are about 41 words (median), the real data's 133
(the four files read).

    python bench/real_shaped_data.py                          # outputs/_data/human_like_dpo_shaped.jsonl
    python bench/real_shaped_data.py --rows 2000 --out /tmp/rows.jsonl --seed 1
"""
from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.data import SAMPLE_DATASET, read_local_rows  # noqa: E402
from helpers.records import atomic_write_text  # noqa: E402

DEFAULT_OUT = ROOT / "outputs" / "_data" / "human_like_dpo_shaped.jsonl"
REAL_ROWS = 10_884
# Word counts at the 0th, 5th, ..., 100th percentile of the 7,162 rows read (see the module's docstring).
QUANTILES = {
    "prompt": [1, 7, 8, 8, 9, 9, 10, 10, 10, 11, 11, 12, 12, 12, 13, 13, 14, 15, 15, 17, 22],
    "chosen": [8, 58, 69, 77, 84, 92, 100, 108, 116, 125, 133, 142, 151, 160, 170, 180, 193, 208, 228, 257, 461],
    "rejected": [3, 60, 65, 68, 71, 74, 77, 79, 82, 85, 88, 93, 98, 105, 116, 128, 143, 161, 183, 216, 499],
}
READ_SHARE = 7_162 / REAL_ROWS  # rows like the four files read; the rest have longer answers
LONG_ANSWER_SCALE = 2.84  # the two unread files' answers against the read ones', from bytes per row


def draw_words(quantiles: list[int], rng: random.Random) -> int:
    """A word count drawn from a distribution given by its 5% quantiles, linear between them."""
    position = rng.random() * (len(quantiles) - 1)
    low = int(position)
    high = min(low + 1, len(quantiles) - 1)
    return max(1, round(quantiles[low] + (quantiles[high] - quantiles[low]) * (position - low)))


def sentences(rows: list[dict], field: str) -> list[str]:
    """The sentences of one field of the rows."""
    return [s for row in rows for s in re.split(r"(?<=[.!?])\s+", row[field].strip()) if s]


def text_of(words: int, pool: list[str], rng: random.Random) -> str:
    """Sentences drawn from pool until the text has `words` words, the last one cut to fit."""
    out: list[str] = []
    count = 0
    while count < words:
        sentence = rng.choice(pool).split()
        take = sentence[: words - count]
        out.append(" ".join(take))
        count += len(take)
    return " ".join(out)


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows of the real data's schema and lengths (see the module's docstring), the same for the same seed."""
    sample = read_local_rows(SAMPLE_DATASET)
    pools = {field: sentences(sample, field) for field in ("chosen", "rejected")}
    prompts = [row["prompt"] for row in sample]
    rng = random.Random(seed)
    rows = []
    for number in range(n):
        scale = 1.0 if rng.random() < READ_SHARE else LONG_ANSWER_SCALE
        prompt_words = draw_words(QUANTILES["prompt"], rng)
        # sample prompts, cut to the drawn length and made unique by the row's number
        prompt = text_of(prompt_words, prompts, rng).rstrip(".!?") + f" (#{number})?"
        rows.append({"prompt": prompt,
                     "chosen": text_of(round(draw_words(QUANTILES["chosen"], rng) * scale), pools["chosen"], rng),
                     "rejected": text_of(round(draw_words(QUANTILES["rejected"], rng) * scale), pools["rejected"], rng)})
    return rows


def write_rows(path: str | Path, n: int = REAL_ROWS, seed: int = 0) -> Path:
    """Write make_rows(n, seed) as JSON lines to path (through a temporary file); return the path."""
    rows = make_rows(n, seed)
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/real_shaped_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=REAL_ROWS, help=f"rows to write (default {REAL_ROWS:,})")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same rows")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the .jsonl file to write")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows {args.rows} is invalid; it must be a positive integer")
    path = write_rows(args.out, args.rows, args.seed)
    rows = read_local_rows(path)
    median = lambda field: sorted(len(r[field].split()) for r in rows)[len(rows) // 2]  # noqa: E731
    print(f"{len(rows):,} rows in {path} ({path.stat().st_size / 2**20:.1f} MiB); median words: prompt "
          f"{median('prompt')}, chosen {median('chosen')}, rejected {median('rejected')}")


if __name__ == "__main__":
    main()
