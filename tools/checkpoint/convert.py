#!/usr/bin/env python
"""Convert checkpoints between DeepSpeed layouts, the consolidated format and Hugging Face.

    convert.py --input PATH --output DIR --to consolidated
    convert.py --input PATH --output DIR --to deepspeed --expert-model-parallel-size N
    convert.py --input PATH --output DIR --to hf

`--input` is a DeepSpeed `--save` directory (its pointer file picks the tag) or tag directory of
any data/expert-parallel layout and ZeRO stage 0-2, a consolidated directory, or a Hugging Face
GPT-2 directory (e.g. the official `gpt2`) or MoE export of this project.

- consolidated: `model.safetensors` (all experts, global ids) + `config.json`; no pickles.
- deepspeed: model weights for expert-parallel size N, resumable with
  `pretrain_gpt.py --load DIR --no-load-optim --expert-model-parallel-size N` (or `--finetune`).
  Optimizer states are NOT carried (ZeRO partitions depend on the layout); RNG files are fresh
  seeded states for `--world-size` ranks (default N).
- hf: dense -> `GPT2LMHeadModel`; MoE -> remote code (`trust_remote_code=True`), plus GPT-2
  tokenizer files. Random-router models are refused.

Errors are one line on stderr and exit 1 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_selfroute.checkpoint import CheckpointFormatError  # noqa: E402
from megatron_selfroute.checkpoint.adapters import FAMILIES  # noqa: E402
from megatron_selfroute.checkpoint.consolidated import (  # noqa: E402
    build_model,
    load_checkpoint,
    save_consolidated,
)
from megatron_selfroute.cli import one_line_errors  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint directory to read")
    p.add_argument("--output", required=True, help="new (or empty) directory to write")
    p.add_argument("--to", required=True, choices=["consolidated", "deepspeed", "hf"])
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="expert-parallel size of a --to deepspeed checkpoint")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes of the run that will load a --to deepspeed checkpoint "
                        "(default: the expert-parallel size)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    """Do the conversion; returns a one-line summary."""
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CheckpointFormatError(f"--output {args.output} is a file, not a directory")
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise CheckpointFormatError(f"--output {args.output} exists and is not empty")
    if args.world_size is not None and args.world_size < 1:
        raise CheckpointFormatError(f"--world-size must be >= 1, got {args.world_size}")
    if args.expert_model_parallel_size < 1:
        raise CheckpointFormatError(f"--expert-model-parallel-size must be >= 1, got "
                                    f"{args.expert_model_parallel_size}")
    ckpt = load_checkpoint(args.input)
    cfg = ckpt.cfg
    shape = (f"{cfg.moe.num_experts} experts, router {cfg.moe.router_type}" if cfg.moe.is_moe
             else "dense")
    if ckpt.family != "gpt":
        shape = f"{ckpt.family}, {shape}"
    if args.to == "consolidated":
        build_model(ckpt, args.input)  # validates names and shapes against the config
        save_consolidated(ckpt, args.output)
    elif args.to == "deepspeed":
        from megatron_selfroute.checkpoint.deepspeed_io import write_deepspeed

        ep = args.expert_model_parallel_size
        model = build_model(ckpt, args.input, dropless=False)
        os.makedirs(args.output, exist_ok=True)
        tag_dir = write_deepspeed(model, cfg, args.output, ep, args.world_size or ep, ckpt.meta,
                                  ckpt.family, ckpt.shape)
        shape += f", EP={ep}, {os.path.basename(tag_dir)}, no optimizer state"
    else:
        if not FAMILIES[ckpt.family].hf_export:
            raise CheckpointFormatError(f"{args.input}: a {ckpt.family} checkpoint has no "
                                        "Hugging Face export here (convert it to consolidated "
                                        "or deepspeed)")
        from megatron_selfroute.checkpoint.hf_export import export_hf

        for note in export_hf(ckpt, args.output, args.input):
            print(f"note: {note}", file=sys.stderr)
    return f"wrote {args.to} checkpoint {args.output} ({cfg.model.num_layers} layers, {shape})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    existed = os.path.exists(args.output)
    try:
        with one_line_errors(args.debug, (CheckpointFormatError, ValueError, OSError)):
            print(convert(args))
    except SystemExit:
        # a failed conversion leaves no half-written output behind (only what it created)
        if not existed and os.path.isdir(args.output):
            import shutil

            shutil.rmtree(args.output, ignore_errors=True)
        raise


if __name__ == "__main__":
    main()
