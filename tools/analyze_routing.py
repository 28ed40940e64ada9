#!/usr/bin/env python
r"""Expert utilisation of MoE checkpoints (the paper's routing analysis).

    python tools/analyze_routing.py --load CKPT [CKPT ...] --data-path PREFIX \
        [--tokens 4430000] [--labels NAME ...] --output-dir DIR [--batch-size 8] [--device cuda]

Runs every checkpoint (consolidated, DeepSpeed or Hugging Face export) over the same first
`--tokens` tokens of the Megatron dataset PREFIX (.bin/.idx) with dropless routing, and writes
DIR/routing.json, DIR/routing.csv (per layer: normalised entropy, max and per-expert fractions),
DIR/entropy.png and DIR/max_fraction.png (one line per checkpoint) and a layer x expert heat map
per checkpoint; prints the mean normalised entropy and mean max-expert fraction of each. ViT
checkpoints read the validation images of an ImageFolder root (`--data-path ROOT`) instead.
Errors are one line on stderr and exit 1 (`--debug` shows the traceback).
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
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories")
    p.add_argument("--data-path", required=True,
                   help="dataset prefix (PREFIX.bin/.idx); for ViT checkpoints an ImageFolder "
                        "root (its val/ images) or a Hugging Face image dataset")
    p.add_argument("--tokens", type=int, default=4_430_000, help="tokens to route")
    p.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors(args.debug, (CheckpointFormatError, ValueError, OSError)):
        from megatron_selfroute.cli import check_device
        from megatron_selfroute.eval.routing_analysis import (
            analyze,
            format_averages,
            write_outputs,
        )

        if args.tokens < 1:
            raise ValueError(f"--tokens {args.tokens} must be positive")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_device(args.device)
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            raise ValueError(f"--output-dir {args.output_dir} is a file, not a directory")
        results = analyze(args.load, args.data_path, args.tokens, args.labels, args.batch_size,
                          args.device, progress=not args.no_progress)
        paths = write_outputs(results, args.output_dir)
        print(format_averages(results))
        print(f"wrote {len(paths)} files to {args.output_dir}")


if __name__ == "__main__":
    main()
