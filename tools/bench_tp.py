#!/usr/bin/env python
"""Tensor-parallel communication per transformer layer against the bytes that must move.

Starts --tp processes (gloo on CPU, NCCL on GPUs), builds the GPT of --shape with 1 and with 2
layers at TP = --tp, runs one forward and backward of one micro-batch, and counts every byte the
tensor-parallel collectives send (all-reduce and all-gather calls, priced as a ring: an
all-reduce of n bytes sends 2(T-1)/T n per rank, an all-gather of n bytes in all (T-1)/T n). A
layer's traffic is the difference between the two models (embedding and output layer cancel).

The bytes that must move per layer, B x S x D activations of `dtype` size each (Megatron-LM
without sequence parallelism): a dense layer makes its replicated activations whole twice in
forward (after attention, after the MLP) and twice in backward (the column-parallel inputs'
gradients): 4 all-reduces. An MoE layer here routes 1/T of the tokens per rank: attention's 2
all-reduces, and the outputs and the input gradients made whole: 2 all-gathers. Anything above
is overhead (router statistics: an (E + 1)-element count, the aux-loss sums, a learned router's
gradient).

    python tools/bench_tp.py                    # GPT-2 small shape, dense and MoE, TP 2
    python tools/bench_tp.py --shape small --tp 4 --json tp.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"gpt2-small": (768, 12, 1024, 1), "small": (128, 4, 128, 4)}  # D, heads, S, B


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--router-type", default="self")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tp < 2:
        p.error("--tp must be >= 2")
    return args


def _cfg(args, layers: int, moe: bool):
    from megatron_selfroute.arguments import parse_args as trainer_args

    d, heads, s, b = SHAPES[args.shape]
    argv = ["--num-layers", str(layers), "--hidden-size", str(d), "--num-attention-heads",
            str(heads), "--seq-length", str(s), "--micro-batch-size", str(b), "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "50257",
            "--tensor-model-parallel-size", str(args.tp), "--train-iters", "1"]
    if moe:
        argv += ["--num-experts", "8", "--moe-router-topk", "2", "--router-type",
                 args.router_type, "--moe-grouped-gemm", "grouped"]
    return trainer_args(argv)[0]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt
    from megatron_selfroute.parallel.layout import ParallelLayout, init_distributed

    init_distributed("gloo")  # byte counts do not depend on the device: CPU processes
    tp = args.tp
    sent = {"n": 0.0}
    plain_reduce, plain_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        sent["n"] += 2 * (tp - 1) / tp * t.numel() * t.element_size()
        return plain_reduce(t, *a, **k)

    def all_gather(parts, t, *a, **k):
        sent["n"] += (tp - 1) / tp * t.numel() * t.element_size() * tp
        return plain_gather(parts, t, *a, **k)

    report = {"shape": args.shape, "tp": tp, "rows": []}
    d, _, s, b = SHAPES[args.shape]
    for moe in (False, True):
        per_model = []
        for layers in (1, 2):
            cfg = _cfg(args, layers, moe)
            layout = ParallelLayout.from_config(cfg).build_groups()
            torch.manual_seed(0)
            model = parallelize_gpt(GPTModel(cfg, init=False), layout)
            ids = torch.randint(0, 50257, (b, s))
            dist.all_reduce, dist.all_gather = all_reduce, all_gather
            sent["n"] = 0.0
            try:
                out = model(ids, labels=ids)
                (out.loss.mean() + out.aux_loss).backward()
            finally:
                dist.all_reduce, dist.all_gather = plain_reduce, plain_gather
            per_model.append(sent["n"])
        layer = per_model[1] - per_model[0]
        act = b * s * d * 4  # fp32 activations
        must = (4 * 2 * (tp - 1) / tp * act if not moe
                else 2 * 2 * (tp - 1) / tp * act + 2 * (tp - 1) / tp * act)
        report["rows"].append({"layer": "MoE 8 x top-2 " + args.router_type if moe else "dense",
                               "bytes_per_rank": layer, "must_move": must,
                               "ratio": layer / must})
    if dist.get_rank() == 0:
        for r in report["rows"]:
            print(f"[bench_tp] {args.shape} TP {tp} {r['layer']}: {r['bytes_per_rank'] / 2**20:.3f}"
                  f" MiB sent per rank per layer (forward + backward), must move "
                  f"{r['must_move'] / 2**20:.3f} MiB: ratio {r['ratio']:.4f}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.worker:
        worker(args)
        return 0
    from megatron_selfroute.parallel.layout import _free_port, launcher_env

    port = _free_port()
    procs = []
    for rank in range(args.tp):
        env = dict(os.environ, **launcher_env(rank, args.tp, port), OMP_NUM_THREADS="1",
                   DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker",
                                       *(argv if argv is not None else sys.argv[1:])], env=env))
    codes = [p.wait() for p in procs]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
