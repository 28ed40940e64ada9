#!/usr/bin/env python
"""Time full training steps of pretrain_gpt.py's own code path against a bare PyTorch loop on the
same model object, in the same run, interleaved.

The framework step is `Trainer.train_step` + `record` + `log` + `evaluate_save_exit` (the
DeepSpeed engine, the NaN check, routing statistics, the expert-bias hook, the log line at
--log-interval): what a user's `pretrain_gpt.py` run executes per iteration. The bare step runs
the same model object on the same (pre-collated) batch: forward, `loss.backward()`,
`torch.nn.utils.clip_grad_norm_` when --clip-grad > 0 (the default 1.0; nanoGPT's loop),
`torch.optim.AdamW.step()` with the same hyper-parameters (fused; weight decay on matrices only,
in nanoGPT's two parameter groups), `zero_grad` — and on several processes one flat gradient
all-reduce, copied back into the gradients (a bare data-parallel loop). Rounds alternate between
the two, by default step by step, so machine noise hits both; the report gives each side's median
step time, the ratio of medians with its 95% interval (a paired percentile bootstrap over the
interleaved steps: how well the run pins the ratio down) and the spread of per-round ratios
[p10, p90] (how much single steps vary), and the framework's per-part times (data, forward,
backward, optimizer, the rest as bookkeeping), with --json. The timed framework steps run at
the default --timing-log-level 0, as a user's run does; the parts come from the trainer's own
timers over steps of their own after the rounds (on CPU only: on CUDA those timers synchronise
the device).

    python tools/bench_train.py                           # the small shape (20-50 ms on 2 cores)
    python tools/bench_train.py --shape quickstart --moe  # the quickstart model
    python tools/bench_train.py --shape gpt2-small --json out.json
    torchrun --nproc-per-node 2 tools/bench_train.py      # 2 processes (gloo on CPU)
    python tools/bench_train.py --repeat 5                # 5 fresh processes, one after another

One run's interval says how well that run pins its ratio down, not how another process would
measure it: on a 2-core VM the ratio moves by a few percent from process to process (memory
layout, the machine's hour), more than the interval's width. `--repeat K` runs the whole
benchmark in K fresh processes one after another and reports the median of their ratios with
their range (the goal's verdict reads that median).

Extra trainer flags after `--` (e.g. `-- --compile --compile-backend inductor`) apply to both
sides (the bare loop uses the same, possibly compiled, model object).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # layers, hidden, heads, seq, micro-batch, vocabulary
    "small": (2, 128, 4, 128, 4, 4096),  # the small table's SentencePiece vocabulary
    "quickstart": (4, 256, 4, 128, 4, 50257),
    "gpt2-small": (12, 768, 12, 1024, 1, 50257),
}

# about 30-90 s on 2 CPU cores; at the small shape 300 alternations pin the ratio of medians to
# about +-0.02 (95%) on a noisy 2-core VM, where single steps vary by +-0.15
ROUNDS = {"small": 300, "quickstart": 20, "gpt2-small": 5}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--moe", action="store_true", help="8 experts, top-2, self-routing")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternations framework/bare (default by shape: " + ", ".join(
                       f"{k} {v}" for k, v in ROUNDS.items()) + ")")
    p.add_argument("--steps", type=int, default=1,
                   help="steps per side per round (1: the sides alternate step by step, so "
                   "the machine's drift hits both alike)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the benchmark in this many fresh processes, one after another, "
                   "and report the median of their ratios with their range (one process only: "
                   "repeat a torchrun command instead)")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.rounds is None:
        args.rounds = ROUNDS[args.shape]
    for name in ("rounds", "steps", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.repeat > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("--repeat starts fresh single processes; under torchrun (WORLD_SIZE "
                f"{os.environ['WORLD_SIZE']}) repeat the torchrun command instead")
    return args, extra


def repeated(args, extra) -> dict:
    """The benchmark in `args.repeat` fresh processes, one after another: the median of their
    ratios and their range, each process's own report kept."""
    import subprocess
    import tempfile

    child = ["--shape", args.shape, "--rounds", str(args.rounds), "--steps", str(args.steps),
             "--warmup", str(args.warmup)] + (["--moe"] if args.moe else [])
    reports, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for i in range(args.repeat):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *child, "--json", out, "--", *extra]
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                raise SystemExit(f"bench_train: process {i + 1}/{args.repeat} exited with {rc} "
                                 f"(command: {' '.join(cmd)})")
            with open(out) as f:
                reports.append(json.load(f))
            done = i + 1
            eta = (time.time() - t0) / done * (args.repeat - done)
            print(f"[bench_train] process {done}/{args.repeat}: ratio "
                  f"{reports[-1]['ratio']:.3f} (ETA {eta:.0f} s)", flush=True)
    ratios = [r["ratio"] for r in reports]
    report = {"shape": args.shape, "moe": args.moe, "world": 1, "extra_flags": extra,
              "repeat": args.repeat, "ratio": statistics.median(ratios),
              "ratio_min": min(ratios), "ratio_max": max(ratios),
              "framework_ms": statistics.median(r["framework_ms"] for r in reports),
              "bare_ms": statistics.median(r["bare_ms"] for r in reports),
              "processes": reports}
    print(f"[bench_train] {args.shape} {'MoE' if args.moe else 'dense'} x1, {args.repeat} "
          f"processes: ratio median {report['ratio']:.3f} [min {report['ratio_min']:.3f}, max "
          f"{report['ratio_max']:.3f}] (each: " + ", ".join(f"{r:.3f}" for r in ratios) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def trainer_argv(args, extra, timers: bool = True) -> list[str]:
    layers, hidden, heads, seq, mb, vocab = SHAPES[args.shape]
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads",
            str(heads), "--seq-length", str(seq), "--micro-batch-size", str(mb),
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab),
            "--train-iters", str(10**6), "--log-interval", "10", "--eval-interval", str(10**6),
            "--eval-iters", "0", "--timing-log-level", "1" if timers else "0", "--lr", "1e-4"]
    if args.moe:
        argv += ["--num-experts", "8", "--moe-router-topk", "2", "--router-type", "self"]
    return argv + list(extra)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ratio_interval(fw: list[float], bare: list[float], level: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap interval of median(fw) / median(bare), resampling the pairs
    (fw[i], bare[i]) — step i of each side, taken back to back — together. Hand-written because
    the sealed GPU machine may lack scipy; tests/unit/test_bench_train_stats.py checks it against
    `scipy.stats.bootstrap`."""
    if len(fw) != len(bare) or not fw:
        raise ValueError("ratio_interval needs two equally long, non-empty samples")
    rng, n, med = random.Random(seed), len(fw), statistics.median
    stats = []
    for _ in range(resamples):
        idx = rng.choices(range(n), k=n)
        stats.append(med([fw[i] for i in idx]) / med([bare[i] for i in idx]))
    tail = (1 - level) / 2
    return pct(stats, tail), pct(stats, 1 - tail)


def main(argv=None) -> dict:
    args, extra = parse_args(argv if argv is not None else sys.argv[1:])
    if args.repeat > 1:
        return repeated(args, extra)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    import pretrain_gpt
    from megatron_selfroute.arguments import parse_args as trainer_args
    from megatron_selfroute.parallel.layout import ParallelLayout
    from megatron_selfroute.training.logging import print_rank0
    from megatron_selfroute.training.loop import Trainer, _to_device

    # On CUDA the part timers synchronise the device at every start and stop (as Megatron's),
    # which the bare loop does not: there the framework runs untimed and its parts are not
    # reported.
    cfg, _ = trainer_args(trainer_argv(args, extra, timers=not torch.cuda.is_available()))
    layout = ParallelLayout.from_config(cfg)
    trainer = Trainer.setup(cfg, pretrain_gpt.make_task(cfg), layout)
    engine, model = trainer.engine, trainer.engine.module
    world = dist.get_world_size() if dist.is_initialized() else 1
    tr = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    # The same optimizer: fused AdamW with weight decay on matrices only, in nanoGPT's two
    # groups (the framework's are split further into DeepSpeed's MoE groups: its own cost).
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tr.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4,
                            betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps,
                            fused=True)  # as build_engine's
    batch = _to_device(trainer.task, engine, next(trainer.loader))
    tokens, labels = batch["tokens"], batch["labels"]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def framework_step(after_train_step=None):
        step = trainer.train_step()
        if after_train_step is not None:
            after_train_step()
        trainer.record(step)
        trainer.log(step)
        trainer.evaluate_save_exit()

    def bare_step():
        out = model(tokens, labels=labels, iteration=0)
        loss = out.loss.mean() + out.aux_loss
        loss.backward()
        if world > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world  # the mean gradient, back into each .grad (as DDP's buckets end)
            parts = flat.split([g.numel() for g in grads])
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(parts, grads, strict=True)])
        if tr.clip_grad > 0:  # the same optimizer configuration: clipping as nanoGPT does it
            torch.nn.utils.clip_grad_norm_(params, tr.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, n):
        out = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return out

    model.train()
    timed(framework_step, args.warmup)
    timed(bare_step, args.warmup)
    level, trainer.timers.level = trainer.timers.level, 0  # timed: as a run at the default level
    fw, bare, ratios, parts = [], [], [], {}
    t0 = time.time()
    for r in range(args.rounds):
        f = timed(framework_step, args.steps)
        b = timed(bare_step, args.steps)
        fw += f
        bare += b
        ratios.append(statistics.median(f) / statistics.median(b))
        done = r + 1
        if done % max(args.rounds // 10, 1) and done != args.rounds:
            continue  # about ten progress lines
        eta = (time.time() - t0) / done * (args.rounds - done)
        fmed, bmed = statistics.median(fw), statistics.median(bare)
        print_rank0(f"[bench_train] round {done}/{args.rounds}: medians so far framework "
                    f"{1000 * fmed:.1f} ms, bare {1000 * bmed:.1f} ms, ratio {fmed / bmed:.3f} "
                    f"(ETA {eta:.0f} s)")
    trainer.timers.level = level
    if level:  # the parts: framework steps of their own, under the part timers (not timed above)
        def sample():  # after the step, before `log` pops the timers itself
            for k, v in trainer.timers.pop_ms(1).items():
                parts.setdefault(k, []).append(v)

        trainer.timers.pop_ms(1)
        for _ in range(max(10, args.rounds * args.steps // 4)):
            framework_step(sample)
    fw_ms, bare_ms = 1000 * statistics.median(fw), 1000 * statistics.median(bare)
    part_ms = {k: statistics.median(v) for k, v in parts.items()}
    if part_ms:
        part_ms["bookkeeping"] = max(fw_ms - sum(part_ms.values()), 0.0)
    ci_low, ci_high = ratio_interval(fw, bare)
    report = {
        "shape": args.shape, "moe": args.moe, "world": world, "extra_flags": extra,
        "framework_ms": fw_ms, "bare_ms": bare_ms, "ratio": fw_ms / bare_ms,
        "ratio_ci95": [ci_low, ci_high],
        "ratio_p10": pct(ratios, 0.1), "ratio_p90": pct(ratios, 0.9),
        "framework_parts_ms": part_ms, "rounds": args.rounds, "steps": args.steps,
    }
    print_rank0(f"[bench_train] {args.shape} {'MoE' if args.moe else 'dense'} x{world}: "
                f"framework {fw_ms:.1f} ms, bare {bare_ms:.1f} ms per step, ratio "
                f"{report['ratio']:.3f} (95% interval {ci_low:.3f}-{ci_high:.3f}) "
                f"[per round p10 {report['ratio_p10']:.3f}, p90 "
                f"{report['ratio_p90']:.3f}]; parts (ms): " + (", ".join(
                    f"{k} {v:.1f}" for k, v in part_ms.items()) or "n/a (untimed on CUDA)"))
    if args.json and (not dist.is_initialized() or dist.get_rank() == 0):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    trainer.close()
    return report


if __name__ == "__main__":
    from megatron_selfroute.training.loop import run_main

    run_main(main, sys.argv[1:])
