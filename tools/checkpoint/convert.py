#!/usr/bin/env python
"""Convert checkpoints between DeepSpeed layouts, the consolidated format and Hugging Face.

    convert.py --input PATH --output DIR --to consolidated [--optimizer-state]
    convert.py --input PATH --output DIR --to deepspeed [--optimizer-state]
               [--tensor-model-parallel-size T] [--expert-model-parallel-size E]
               [--world-size W] [--zero-stage Z] [--precision fp32|bf16]
    convert.py --input PATH --output DIR --to hf

`--input` is a DeepSpeed `--save` directory (its pointer file picks the tag) or tag directory of
any tensor/data/expert-parallel layout and ZeRO stage 0-2, a consolidated directory, or a Hugging
Face GPT-2 directory (e.g. the official `gpt2`) or MoE export of this project.

- consolidated: `model.safetensors` (all experts, global ids) + `config.json`; no pickles. With
  `--optimizer-state`, also `optimizer.safetensors`: every parameter's fp32 master weight and
  Adam moments under its one-device name, Adam's step, the iteration and the data position.
- deepspeed: a checkpoint of layout TP T x EP E on W processes (default W = T x E), ZeRO stage
  Z and precision (default: the input's; the fp32 masters carry over either way). With
  `--optimizer-state` (from a DeepSpeed input with optimizer states, or a consolidated one with
  `optimizer.safetensors`) it resumes as the original run would, optimizer included:
  `pretrain_gpt.py --load DIR --tensor-model-parallel-size T --expert-model-parallel-size E` on
  W processes. Without it, weights only: resume with
  `--no-load-optim` (or `--finetune`); RNG files are fresh seeded states.
- hf: dense -> `GPT2LMHeadModel`; MoE -> remote code (`trust_remote_code=True`), plus GPT-2
  tokenizer files. Random-router models are refused.

Carrying optimizer states, and any tensor-parallel output, runs the real engine on CPU in the
world it reads or writes (W gloo processes, `checkpoint/reshard.py`), so DeepSpeed itself
partitions and reassembles ZeRO's flat buffers.

Errors are one line on stderr and exit 1 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

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
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel size of a --to deepspeed checkpoint")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes of the run that will load a --to deepspeed checkpoint "
                        "(default: tensor x expert-parallel size)")
    p.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2],
                   help="ZeRO stage of a --to deepspeed checkpoint with optimizer state "
                        "(default: the input's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="training precision of a --to deepspeed checkpoint written by the "
                        "layout's engine (default: the input's); resume it with the same "
                        "(--bf16 or not). The fp32 masters carry over either way")
    p.add_argument("--optimizer-state", action="store_true",
                   help="carry the fp32 master weights and Adam moments (and the data "
                        "position) across the conversion")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CheckpointFormatError(f"--output {args.output} is a file, not a directory")
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise CheckpointFormatError(f"--output {args.output} exists and is not empty")
    if args.world_size is not None and args.world_size < 1:
        raise CheckpointFormatError(f"--world-size must be >= 1, got {args.world_size}")
    for flag in ("expert_model_parallel_size", "tensor_model_parallel_size"):
        if getattr(args, flag) < 1:
            raise CheckpointFormatError(f"--{flag.replace('_', '-')} must be >= 1, got "
                                        f"{getattr(args, flag)}")
    if args.to == "hf" and args.optimizer_state:
        raise CheckpointFormatError("--optimizer-state: a Hugging Face export holds weights only")
    if args.to != "deepspeed" and (args.tensor_model_parallel_size > 1 or args.zero_stage
                                   is not None or args.expert_model_parallel_size > 1
                                   or args.world_size is not None
                                   or args.precision is not None):
        raise CheckpointFormatError("--tensor-model-parallel-size, --expert-model-parallel-size, "
                                    "--world-size, --zero-stage and --precision describe a --to "
                                    "deepspeed output")


def _engine_path_ok(ckpt) -> None:
    """What the CPU engine worlds of `checkpoint/reshard.py` cannot run."""
    if ckpt.cfg.train.fp16:
        raise CheckpointFormatError("an fp16 checkpoint cannot go through the CPU conversion "
                                    "engine (DeepSpeed's CPU accelerator has no fp16, and the "
                                    "loss scaler is not carried); convert without "
                                    "--optimizer-state, at TP 1")


def _optimizer_source(args: argparse.Namespace) -> Optional[dict]:
    """Check that the input carries an optimizer state before anything is written; returns
    the run state of a DeepSpeed input (None for a consolidated one)."""
    from megatron_selfroute.checkpoint import deepspeed_io, reshard
    from megatron_selfroute.checkpoint.files import resolve_tag_dir

    if reshard.has_optimizer_state(args.input):
        return None
    if not deepspeed_io.is_deepspeed_checkpoint(args.input):
        raise CheckpointFormatError(f"--optimizer-state: {args.input} holds no optimizer state "
                                    "(a consolidated checkpoint without "
                                    f"{reshard.OPTIMIZER}, or a Hugging Face one)")
    tag_dir = resolve_tag_dir(args.input)
    state = deepspeed_io.run_state(tag_dir)
    if state.get("weights_only"):
        raise CheckpointFormatError(f"--optimizer-state: {tag_dir} holds weights only (a "
                                    "converted checkpoint without optimizer state)")
    return state


def _source_optimizer(args: argparse.Namespace, ckpt, out_dir: str,
                      state: Optional[dict]) -> None:
    """Write the input's optimizer state as `out_dir/optimizer.safetensors` (exported by the
    input's own world when it is a DeepSpeed checkpoint; `state`: what `_optimizer_source`
    found)."""
    import shutil

    from megatron_selfroute.checkpoint import reshard
    from megatron_selfroute.checkpoint.files import resolve_tag_dir

    if state is None:
        shutil.copyfile(os.path.join(args.input, reshard.OPTIMIZER),
                        os.path.join(out_dir, reshard.OPTIMIZER))
        return
    _engine_path_ok(ckpt)
    tag_dir = resolve_tag_dir(args.input)
    world = int(state["world_size"])
    print(f"> reading the optimizer states of {tag_dir} on {world} CPU processes",
          file=sys.stderr, flush=True)
    meta = {"iteration": int(state.get("iteration", 0)),
            "consumed_train_samples": int(state.get("consumed_train_samples", 0)),
            "skipped_steps": int(state.get("skipped_steps", 0))}
    reshard.run_world({"mode": "export", "config": state["config"], "family": ckpt.family,
                       "shape": ckpt.shape, "input": tag_dir, "output": out_dir,
                       "meta": meta}, world)


def _to_layout(args: argparse.Namespace, ckpt) -> str:
    """A DeepSpeed checkpoint of the requested layout written by that layout's own engine."""
    import shutil

    from megatron_selfroute.checkpoint import reshard
    from megatron_selfroute.config import Config
    from megatron_selfroute.parallel.layout import ParallelLayout

    _engine_path_ok(ckpt)
    source = _optimizer_source(args) if args.optimizer_state else None
    cfg = Config.from_dict(ckpt.cfg.to_dict())
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.expert_model_parallel_size = ep
    if args.zero_stage is not None:
        cfg.parallel.zero_stage = args.zero_stage
    if args.precision is not None:
        cfg.train.bf16, cfg.train.fp16 = args.precision == "bf16", False
    cfg.train.load = cfg.train.save = None
    world = args.world_size or tp * ep
    ParallelLayout(world_size=world, rank=0, tp=tp, ep=ep, moe=cfg.moe.is_moe).validate(cfg)
    os.makedirs(args.output, exist_ok=True)
    staged = os.path.join(args.output, ".consolidated.tmp")  # the layout-free form
    try:
        save_consolidated(ckpt, staged)
        if args.optimizer_state:
            _source_optimizer(args, ckpt, staged, source)
        print(f"> writing TP {tp} x EP {ep} on {world} CPU processes (ZeRO "
              f"{cfg.parallel.zero_stage})", file=sys.stderr, flush=True)
        reshard.run_world({"mode": "import", "config": cfg.to_dict(), "family": ckpt.family,
                           "shape": ckpt.shape, "input": staged, "output": args.output,
                           "meta": dict(ckpt.meta), "optimizer": args.optimizer_state}, world)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    carried = "optimizer state carried" if args.optimizer_state else "no optimizer state"
    precision = "bf16" if cfg.train.bf16 else "fp32"
    return (f"TP={tp}, EP={ep}, {world} processes, ZeRO {cfg.parallel.zero_stage}, "
            f"{precision}, {carried}")


def convert(args: argparse.Namespace) -> str:
    """Do the conversion; returns a one-line summary."""
    _check_args(args)
    ckpt = load_checkpoint(args.input)
    cfg = ckpt.cfg
    shape = (f"{cfg.moe.num_experts} experts, router {cfg.moe.router_type}" if cfg.moe.is_moe
             else "dense")
    if ckpt.family != "gpt":
        shape = f"{ckpt.family}, {shape}"
    if args.to == "consolidated":
        build_model(ckpt, args.input)  # validates names and shapes against the config
        # an input without optimizer state is refused before anything is written
        source = _optimizer_source(args) if args.optimizer_state else None
        save_consolidated(ckpt, args.output)
        if args.optimizer_state:
            _source_optimizer(args, ckpt, args.output, source)
            shape += ", optimizer state"
    elif args.to == "deepspeed" and (args.optimizer_state or args.tensor_model_parallel_size > 1
                                     or args.zero_stage is not None
                                     or args.precision is not None):
        build_model(ckpt, args.input, dropless=False)
        shape += ", " + _to_layout(args, ckpt)
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
    was_empty = os.path.isdir(args.output) and not os.listdir(args.output)
    try:
        with one_line_errors(args.debug, (CheckpointFormatError, ValueError, OSError)):
            print(convert(args))
    except SystemExit:
        # a failed conversion leaves no half-written output behind (only what it created: an
        # --output that existed and was empty is emptied again)
        import shutil

        if not existed and os.path.isdir(args.output):
            shutil.rmtree(args.output, ignore_errors=True)
        elif was_empty and os.path.isdir(args.output):
            for name in os.listdir(args.output):
                path = os.path.join(args.output, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        raise


if __name__ == "__main__":
    main()
