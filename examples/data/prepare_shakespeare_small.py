#!/usr/bin/env python
"""The SCALE=small data: the bundled Shakespeare split by lines into train / valid / test files,
a SentencePiece vocabulary trained on the train part only, and one Megatron prefix per split.

    python examples/data/prepare_shakespeare_small.py [--out-dir data/small] [--vocab-size 4096]

Lines [0, 90%) are training text, [90%, 95%) validation (held-out loss during training) and
[95%, 100%) test (the local lm-eval tasks of examples/tasks/ and the routing analysis read it;
they come from the same last ~9,400 lines). At GPT-2 BPE the 50k-word output layer would be most
of a hidden-128 model's FLOPs and router effects would drown; a 4k vocabulary keeps the MoE
layers the larger share (`tools/sweep.py` prints the split). Writes OUT/sp.model and
OUT/{train,valid,test}_text_document.{bin,idx}; an existing complete output is kept.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron_selfroute.data.corpus import text_to_jsonl  # noqa: E402

SPLITS = (("train", 0.0, 0.90), ("valid", 0.90, 0.95), ("test", 0.95, 1.0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "data", "small"))
    p.add_argument("--source", default=os.path.join(ROOT, "data", "shakespeare.txt"))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    if not 256 <= args.vocab_size <= 8192:
        sys.exit(f"error: --vocab-size {args.vocab_size} must be in [256, 8192]")
    out = os.path.abspath(args.out_dir)
    prefixes = [os.path.join(out, f"{name}_text_document") for name, _, _ in SPLITS]
    model = os.path.join(out, "sp.model")
    if os.path.isfile(model) and all(os.path.isfile(x + ".idx") for x in prefixes):
        print(f"data/small exists: {out}")
        return
    import sentencepiece as spm

    os.makedirs(out, exist_ok=True)
    with open(args.source, encoding="utf-8") as f:
        lines = f.readlines()
    with tempfile.TemporaryDirectory() as tmp:
        parts = {}
        for name, lo, hi in SPLITS:
            parts[name] = os.path.join(tmp, f"{name}.txt")
            with open(parts[name], "w", encoding="utf-8") as f:
                f.writelines(lines[int(lo * len(lines)):int(hi * len(lines))])
        spm.SentencePieceTrainer.train(
            input=parts["train"], model_prefix=os.path.join(tmp, "sp"),
            vocab_size=args.vocab_size, model_type="bpe", character_coverage=1.0,
            byte_fallback=True, eos_id=1, bos_id=-1, pad_id=-1, unk_id=0,
            num_threads=max(args.workers, 1), minloglevel=2)
        os.replace(os.path.join(tmp, "sp.model"), model + ".tmp")
        for name, _, _ in SPLITS:
            jsonl = os.path.join(tmp, f"{name}.jsonl")
            text_to_jsonl(parts[name], jsonl, lines_per_doc=40)
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                            "--input", jsonl, "--output-prefix", os.path.join(out, name),
                            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                            model + ".tmp", "--append-eod", "--workers", str(args.workers)],
                           check=True)
        os.replace(model + ".tmp", model)
    print(f"wrote {model} and {', '.join(prefixes)}")


if __name__ == "__main__":
    main()
