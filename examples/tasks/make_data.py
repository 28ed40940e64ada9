#!/usr/bin/env python
"""Regenerate examples/tasks/data/*.jsonl: small lm-eval tasks cut from the bundled Shakespeare.

Every item comes from lines 180,000 onwards of data/shakespeare.txt (its last ~4%). Trained with
`--split 95,5,0` on the 100-line documents of examples/data/prepare_shakespeare.sh (what
`SCALE=tiny` in examples/gpt2/settings.sh does with Shakespeare data), those lines fall in the
validation documents, so the tiny models never train on them.

  shakespeare_next_line.jsonl  multiple choice (HellaSwag/PIQA-like): two lines of verse, pick the
                               true next line among 4 (3 distractor lines from the same region)
  shakespeare_last_word.jsonl  LAMBADA-like: predict a verse line's last word (perplexity, acc)
  shakespeare_passages.jsonl   WikiText-like: 12-line passages scored by rolling loglikelihood

Deterministic (seeded); run from anywhere: python examples/tasks/make_data.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[1] / "data" / "shakespeare.txt"
START_LINE = 180_000
SEED = 2604
N_CHOICE, N_LAST_WORD, N_PASSAGES, PASSAGE_LINES = 120, 120, 40, 12


def is_verse(line: str) -> bool:
    """A line of speech: at least 5 words, not a speaker tag, stage direction or heading."""
    words = line.split()
    return (len(words) >= 5 and not line.isupper() and not line.startswith(("[", "Enter", "Exit"))
            and not re.match(r"^(ACT|SCENE)\b", line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "data"), help="output directory")
    out = Path(parser.parse_args().out)
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines()[START_LINE:]]
    rng = random.Random(SEED)
    verse = [i for i in range(2, len(lines) - 1) if is_verse(lines[i])]
    pool = [lines[i] for i in verse]

    triples = [i for i in verse if is_verse(lines[i - 1]) and is_verse(lines[i + 1])]
    next_line = []
    for i in sorted(rng.sample(triples, N_CHOICE)):
        choices = [lines[i + 1]]
        while len(choices) < 4:
            d = rng.choice(pool)
            if d not in choices and d not in (lines[i - 1], lines[i]):
                choices.append(d)
        rng.shuffle(choices)
        next_line.append({"context": lines[i - 1] + "\n" + lines[i], "choices": choices,
                          "gold": choices.index(lines[i + 1])})

    ends = [i for i in verse if re.search(r"[A-Za-z]{3,}$", lines[i]) and is_verse(lines[i - 1])]
    last_word = [{"text": lines[i - 1] + "\n" + lines[i]}
                 for i in sorted(rng.sample(ends, N_LAST_WORD))]

    starts = range(0, len(lines) - PASSAGE_LINES, (len(lines) - PASSAGE_LINES) // N_PASSAGES)
    passages = [{"page": "\n".join(lines[s:s + PASSAGE_LINES]).strip()}
                for s in list(starts)[:N_PASSAGES]]

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("shakespeare_next_line", next_line), ("shakespeare_last_word", last_word),
                       ("shakespeare_passages", passages)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} items to {out / name}.jsonl")


if __name__ == "__main__":
    main()
