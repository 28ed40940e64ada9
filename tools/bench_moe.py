"""Benchmark one MoE layer against its active-compute limit, measured side by side in one run.

The limit is one dense FFN (the same expert shape) over all T*k routed token-slots: what a perfect
MoE layer would cost. For each dispatcher and each routing imbalance (the max expert fraction is
set by biasing a learned router's logits towards expert 0), forward+backward time is divided by the
limit's (interleaved repetitions, median and spread), and the bytes of tensors saved for backward
(saved-tensor hooks; on GPU the peak allocation above the step's start) are divided by the
limit's. `--world 2` also measures the bytes the all-to-all sends (count exchange included, rows
kept for local experts excluded) over the bytes that must move (rows routed to another rank's
experts, there and back).
`--train` reports tokens/s of a small MoE GPT training run per dispatcher and router.

    python tools/bench_moe.py                      # GPT-2 small shapes, fp32 (bf16 on GPU)
    python tools/bench_moe.py --world 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_selfroute.config import Config  # noqa: E402
from megatron_selfroute.models.transformer import MLP  # noqa: E402
from megatron_selfroute.moe.context import RoutingContext  # noqa: E402
from megatron_selfroute.moe.layer import MoELayer  # noqa: E402
from megatron_selfroute.moe.router import BUILTIN_ROUTERS  # noqa: E402
from megatron_selfroute.parallel.layout import (  # noqa: E402
    ParallelLayout,
    init_distributed,
    launcher_env,
)

AUTOEP_NOTE = ("DeepSpeed AutoEP not benchmarked: its experts are gated (SwiGLU/GEGLU) only, "
               "GPT-2's experts are plain GELU MLPs")


BENCH_VOCAB = 50257


def bench_token_ids(num_tokens: int, device) -> torch.Tensor:
    """Token ids for routers that read them: a fixed pseudo-random draw over the vocabulary."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, BENCH_VOCAB, (num_tokens,), generator=gen).to(device)


def build_layer(args, dispatcher: str, router: str, layout: ParallelLayout | None = None
                ) -> MoELayer:
    cfg = Config()
    cfg.model.hidden_size, cfg.model.ffn_hidden_size = args.hidden, args.ffn
    m = cfg.moe
    m.num_experts, m.moe_router_topk, m.router_type = args.experts, args.topk, router
    m.moe_token_dispatcher_type = dispatcher
    m.moe_grouped_gemm = args.expert_compute
    cfg.model.vocab_size = BENCH_VOCAB  # read only by routers that read token ids (hash)
    torch.manual_seed(0)
    layout = layout or ParallelLayout.single(cfg)
    layer = MoELayer(cfg.model, m, layer_number=0, moe_index=0, seed=0)
    layer.parallelize(layout.ep_rank, layout.ep, layout.ep_group, torch.device("cpu"))
    layer.reset_experts(seed=0, std=cfg.model.init_method_std)
    return layer.to(args.device, args.dtype)


def bias_for_max_fraction(layer: MoELayer, x, target: float) -> float:
    """Logit bias on expert 0 giving the target max expert fraction (bisection)."""
    with torch.no_grad():
        logits = layer.router.logits(x, RoutingContext())
    lo, hi = -20.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        biased = logits.clone()
        biased[:, 0] += mid
        ids = torch.topk(biased, layer.router.topk, -1).indices
        frac = torch.bincount(ids.reshape(-1), minlength=layer.num_experts).max().item()
        frac /= ids.numel()
        lo, hi = (mid, hi) if frac < target else (lo, mid)
    return (lo + hi) / 2


def biased_router(layer: MoELayer, bias: float) -> None:
    plain = layer.router.logits

    def logits(x, ctx):
        z = plain(x, ctx)
        return torch.cat([z[:, :1] + bias, z[:, 1:]], dim=1)

    layer.router.logits = logits


def saved_bytes(fn, params=()) -> int:
    """Bytes of distinct activation tensors autograd saves for backward while running fn()
    (storages of the modules' own parameters excluded: they exist whatever the routing)."""
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return sum(seen.values())


def step_time(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn().float().sum().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_memory(fn, device, params) -> int:
    """CPU: saved activation bytes. CUDA: the step's peak allocation above what was allocated
    before it. A first step makes the parameter (and input) gradients, which the measured step
    accumulates into in place, so weights and their gradients count on neither side; without
    the baseline every layer built so far would count."""
    if device.startswith("cuda"):
        fn().float().sum().backward()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return saved_bytes(fn, params)


def layer_bench(args) -> dict:
    """Time and memory ratios per dispatcher and imbalance, plus the four routers at init."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, args.dtype)
    limit = MLP(args.hidden, args.ffn, bias=True).to(args.device, args.dtype)
    slots = x.repeat_interleave(args.topk, 0)  # one FFN over all T*k token-slots
    variants = {"limit": lambda: limit(slots)}
    params = {"limit": list(limit.parameters())}
    rows = []
    for target in args.imbalance:
        for disp in args.dispatchers:
            layer = build_layer(args, disp, "learned")
            biased_router(layer, bias_for_max_fraction(layer, x.float(), target))
            variants[f"{disp}@{target}"] = (lambda lay=layer: lay(x)[0])
            params[f"{disp}@{target}"] = list(layer.parameters())
            rows.append(("learned", disp, target, layer))
    for router in BUILTIN_ROUTERS:
        layer = build_layer(args, "alltoall", router)
        ctx = RoutingContext(None, bench_token_ids(x.shape[0], x.device), 0)
        variants[f"alltoall@{router}"] = (lambda lay=layer, c=ctx: lay(x, c)[0])
        params[f"alltoall@{router}"] = list(layer.parameters())
        rows.append((router, "alltoall", None, layer))
    for fn in variants.values():  # warm-up
        step_time(fn, args.device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):  # interleaved repetitions
        for k, fn in variants.items():
            times[k].append(step_time(fn, args.device))
    mem = {k: peak_memory(fn, args.device, params[k]) for k, fn in variants.items()}
    base_t, base_m = statistics.median(times["limit"]), mem["limit"]
    table = []
    for router, disp, target, layer in rows:
        key = f"{disp}@{target}" if target is not None else f"alltoall@{router}"
        ratios = sorted(t / base_t for t in times[key])
        counts = layer.last_tokens_per_expert.float()
        table.append({
            "router": router, "dispatcher": disp,
            "max_fraction": round((counts.max() / counts.sum()).item(), 3),
            "time_ratio_median": statistics.median(ratios),
            "time_ratio_min": ratios[0], "time_ratio_max": ratios[-1],
            "median_ms": 1000 * statistics.median(times[key]),
            "memory_ratio": mem[key] / base_m,
        })
    return {"limit_median_ms": 1000 * base_t, "limit_memory_bytes": base_m, "rows": table}


def volume_worker(rank: int, world: int, port: int, args, queue) -> None:
    """One rank of the 2-process all-to-all volume measurement (on CPU processes over gloo even
    on a GPU machine: the bytes sent do not depend on the device)."""
    import copy

    args = copy.copy(args)
    args.device = "cpu"
    os.environ.update(launcher_env(rank, world, port))
    init_distributed("gloo")
    bytes_per = torch.finfo(args.dtype).bits // 8
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, args.dtype)
    out = []
    cfg = Config()
    cfg.moe.num_experts, cfg.parallel.expert_model_parallel_size = args.experts, world
    layout = ParallelLayout.from_config(cfg).build_groups()
    for target in args.imbalance:
        for disp in args.dispatchers:
            layer = build_layer(args, disp, "learned", layout)
            biased_router(layer, bias_for_max_fraction(layer, x.float(), target))
            sent = _count_sent_bytes(lambda lay=layer: lay(x))
            counts = layer.last_tokens_per_expert
            local = counts.view(world, -1)[rank].sum().item()
            must = (counts.sum().item() - local) * args.hidden * bytes_per * 2
            out.append({"dispatcher": disp, "max_fraction": target, "rank": rank,
                        "sent_bytes": sent, "must_move_bytes": must})
    queue.put(out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _count_sent_bytes(fn) -> int:
    """Bytes this rank sends to other ranks through all_to_all_single during fn() (forward)."""
    import torch.distributed as dist

    real = dist.all_to_all_single
    total = {"b": 0}

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 async_op=False):
        me = dist.get_rank(group)
        world = dist.get_world_size(group)
        row = input[0].numel() * input.element_size() if input.dim() > 1 else input.element_size()
        splits = input_split_sizes or [input.shape[0] // world] * world
        total["b"] += sum(s for i, s in enumerate(splits) if i != me) * row
        return real(output, input, output_split_sizes, input_split_sizes, group=group,
                    async_op=async_op)

    dist.all_to_all_single = counting
    try:
        with torch.no_grad():
            fn()
    finally:
        dist.all_to_all_single = real
    return total["b"]


def volume_bench(args) -> list[dict]:
    import torch.multiprocessing as mp

    from tests.distributed.harness import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=volume_worker, args=(r, args.world, port, args, queue))
             for r in range(args.world)]
    for p in procs:
        p.start()
    results = [item for _ in procs for item in queue.get(timeout=900)]
    for p in procs:
        p.join()
    merged = {}
    for r in results:
        key = (r["dispatcher"], r["max_fraction"])
        acc = merged.setdefault(key, {"sent_bytes": 0, "must_move_bytes": 0})
        acc["sent_bytes"] += r["sent_bytes"]
        acc["must_move_bytes"] += r["must_move_bytes"]
    return [{"dispatcher": d, "max_fraction": f, **v,
             "volume_ratio": v["sent_bytes"] / max(v["must_move_bytes"], 1)}
            for (d, f), v in merged.items()]


def train_bench(args) -> list[dict]:
    """tokens/s of a small MoE GPT (mock data) per dispatcher and router; report only."""
    out = []
    for disp in args.dispatchers:
        for router in BUILTIN_ROUTERS:
            cmd = [sys.executable, str(REPO / "pretrain_gpt.py"), "--num-layers", "4",
                   "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "256",
                   "--num-experts", "8", "--router-type", router, "--moe-token-dispatcher-type",
                   disp, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                   "8191", "--micro-batch-size", "4", "--train-iters", str(args.train_iters),
                   "--log-interval", str(args.train_iters), "--eval-interval", "100000"]
            if args.dtype == torch.bfloat16:
                cmd.append("--bf16")
            log = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout
            found = re.findall(r"tokens/s (\d+)", log)
            out.append({"dispatcher": disp, "router": router,
                        "tokens_per_sec": int(found[-1]) if found else None})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--imbalance", type=float, nargs="+", default=[0.13, 0.37, 0.49])
    p.add_argument("--dispatchers", nargs="+", default=["alltoall", "deepspeed"])
    p.add_argument("--expert-compute", default="auto", choices=["auto", "loop", "grouped"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--world", type=int, default=1, help="2: also measure all-to-all volume")
    p.add_argument("--train", action="store_true", help="also tokens/s of a small training run")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": dtype, "tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn,
              "experts": args.experts, "topk": args.topk, "reps": args.reps,
              "expert_compute": args.expert_compute,
              "autoep": AUTOEP_NOTE, "layer": layer_bench(args)}
    print(f"device {result['device']} {dtype}, expert compute {args.expert_compute}; "
          f"limit = one FFN over {args.tokens * args.topk} "
          f"token-slots: {result['layer']['limit_median_ms']:.1f} ms median")
    print(f"{'router':>12} {'dispatcher':>10} {'max frac':>8} {'time/limit':>10} "
          f"{'[min, max]':>14} {'mem/limit':>9}")
    for r in result["layer"]["rows"]:
        print(f"{r['router']:>12} {r['dispatcher']:>10} {r['max_fraction']:8.3f} "
              f"{r['time_ratio_median']:10.2f} [{r['time_ratio_min']:5.2f}, "
              f"{r['time_ratio_max']:5.2f}] {r['memory_ratio']:9.2f}")
    by = {(r["dispatcher"], r["max_fraction"]): r for r in result["layer"]["rows"]
          if r["router"] == "learned"}
    for (disp, frac), r in by.items():
        if disp == "alltoall" and ("deepspeed", frac) in by:
            speedup = by[("deepspeed", frac)]["median_ms"] / r["median_ms"]
            print(f"alltoall vs deepspeed dropless at max fraction {frac:.2f}: {speedup:.2f}x")
    print(AUTOEP_NOTE)
    if args.world > 1:
        result["volume"] = volume_bench(args)
        for v in result["volume"]:
            print(f"all-to-all volume {v['dispatcher']:>10} @ {v['max_fraction']:.2f}: "
                  f"{v['volume_ratio']:.3f} x must-move ({v['sent_bytes']} B)")
    if args.train:
        result["train"] = train_bench(args)
        for t in result["train"]:
            print(f"train {t['dispatcher']:>10} {t['router']:>12}: {t['tokens_per_sec']} tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
