#!/usr/bin/env python
r"""Sample a continuation of a prompt from a checkpoint.

    python tools/generate.py --load CKPT --prompt "To be, or not to be" \
        [--max-new-tokens 50] [--temperature 0.8] [--top-k 0] [--top-p 1.0] [--seed 1234]

CKPT is anything `load_model` reads (consolidated, DeepSpeed, Hugging Face GPT-2); routing is
dropless. `--temperature 0` is greedy decoding. Sampling uses its own generator seeded by
`--seed`, so the same command prints the same text. Generation stops at the end-of-text token
or after `--max-new-tokens`; the prompt and its continuation are printed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_selfroute.checkpoint import CheckpointFormatError  # noqa: E402
from megatron_selfroute.cli import one_line_errors  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """The prompt followed by its sampled continuation."""
    import math

    import torch

    from megatron_selfroute.checkpoint.consolidated import load_model
    from megatron_selfroute.cli import check_device
    from megatron_selfroute.data.tokenizer import build_tokenizer
    from megatron_selfroute.eval.generation import generate

    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # also refuses nan
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_device(args.device)
    model, cfg = load_model(args.load, args.device)
    d = cfg.data
    tok = build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model,
                          cfg.model.vocab_size)
    try:
        ids = tok.tokenize(args.prompt)
    except ValueError as e:
        raise ValueError(f"--prompt {args.prompt!r} cannot be encoded by the checkpoint's "
                         f"{d.tokenizer_type} ({e})") from None
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    generator = torch.Generator().manual_seed(args.seed)
    eos = tok.eod if tok.eod < cfg.model.vocab_size else None
    new = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   generator, eos_id=eos)[0]
    return tok.detokenize(ids + new)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors(args.debug, (CheckpointFormatError, ValueError, OSError)):
        print(run(args))


if __name__ == "__main__":
    main()
