#!/usr/bin/env python
"""A first hour on a GPU that checks itself: numerics against pre-registered bounds.

Runs pretrain_gpt.py's own code (in this process, one rank) on a small MoE GPT (2 blocks, hidden
128, 8 experts top-2, self router, every block MoE, mock data, dropout 0, 50 steps) and prints one
PASS/FAIL line per check, with --json:

1. **fp32 on this device vs the CPU**: the per-step losses against the same run's fp32 CPU losses
   recorded in the repository (tools/reference/first_hour_cpu.json), in two windows: max
   |difference| over the first EARLY_STEPS steps <= FP32_VS_CPU_EARLY (before routing
   decisions near a tie have had time to flip and compound), and over all 50 steps <=
   FP32_VS_CPU.
2. **bf16 drift**: bf16 against fp32 on this device; max |difference| <= BF16_VS_FP32.
3. **determinism**: two fp32 runs under --deterministic give bit-identical losses.

The bounds are fixed here, before any GPU run (see docs/PERFORMANCE.md for how they were set):
`--calibrate` measures, on the CPU, what each bound is built from: the drift that reordering
fp32 sums alone produces over 50 steps (the same run at another intra-op thread count), and
bf16's drift against fp32 on the CPU.

    python tools/first_hour.py                      # the checks, on CUDA if present
    python tools/first_hour.py --record-reference   # CPU only: rewrite the reference file
    python tools/first_hour.py --calibrate          # CPU only: the drifts behind the bounds
    python tools/first_hour.py --steps 10 --no-reference   # SMOKE: the script itself, any device

Exit status: 0 all checks pass, 3 a check fails (a result), 2 a bad argument or a run that cannot
start, 1 anything else that went wrong (an uncaught error).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

# Before torch makes its first cuBLAS handle: cuBLAS reads its workspace setting once per
# process, and the --deterministic runs below come after fp32 and bf16 runs that made it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFERENCE = REPO / "tools" / "reference" / "first_hour_cpu.json"

# Pre-registered bounds (absolute, on the lm loss, in nats; the loss starts near ln 4096 = 8.3).
# Revised 2026-12-02 (fourth session), still before any GPU run: the 50-step fp32 bound was
# 1e-3, set from reordered sums on one CPU (4.8e-7), but this run on another CPU (AMX instead of
# AVX-512, the same torch) leaves the AVX-512 reference at step 22 (a route flipping, 8e-5)
# and drifts to 2.6e-3 by step 49, while its first 16 steps are bit-identical.
EARLY_STEPS = 10
FP32_VS_CPU_EARLY = 1e-3
FP32_VS_CPU = 1e-2
BF16_VS_FP32 = 0.05

STEPS = 50


def run_argv(steps: int, extra: list[str]) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
            "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096",
            "--num-experts", "8", "--moe-router-topk", "2", "--router-type", "self",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", str(steps),
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--log-interval", "10",
            "--eval-iters", "0", "--seed", "1234", *extra]


def losses(steps: int, extra: list[str]) -> list[float]:
    import pretrain_gpt

    result = pretrain_gpt.main(run_argv(steps, extra))
    return [result.losses[i] for i in range(1, steps + 1)]


def max_abs(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf)
               for x, y in zip(a, b, strict=True))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (f"cpu ({platform.machine()} {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads)")


def record_reference(steps: int) -> dict:
    import torch

    ref = {"argv": run_argv(steps, []), "device": device_name(), "torch": torch.__version__,
           "losses": losses(steps, [])}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    tmp = REFERENCE.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref, indent=1) + "\n")
    os.replace(tmp, REFERENCE)
    print(f"[first_hour] wrote {REFERENCE.relative_to(REPO)} ({steps} steps on {ref['device']})")
    return ref


def calibrate(steps: int) -> dict:
    import torch

    threads = torch.get_num_threads()
    base = losses(steps, [])
    torch.set_num_threads(1 if threads > 1 else 2)
    reordered = losses(steps, [])
    torch.set_num_threads(threads)
    bf16 = losses(steps, ["--bf16"])
    out = {"fp32_reordered_sums": max_abs(base, reordered), "bf16_vs_fp32": max_abs(base, bf16),
           "threads": [threads, 1 if threads > 1 else 2], "device": device_name()}
    print(f"[first_hour] calibration on {out['device']}: fp32 with reordered sums (threads "
          f"{out['threads'][0]} vs {out['threads'][1]}) max |d| {out['fp32_reordered_sums']:.3g}; "
          f"bf16 vs fp32 max |d| {out['bf16_vs_fp32']:.3g}")
    return out


def check(steps: int, use_reference: bool, reference: Path = REFERENCE) -> dict:
    import torch

    results = {"device": device_name(), "steps": steps, "checks": {}}

    def verdict(name: str, value: float, bound: float, detail: str) -> None:
        ok = value <= bound
        results["checks"][name] = {"value": value, "bound": bound, "pass": ok}
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail} {value:.3g} (bound {bound:g})")

    def attempt(extra: list[str]) -> list[float]:
        """The run's losses; a run that crashes gives NaN losses (its check fails, the others
        still run) and one line naming the error."""
        try:
            return losses(steps, extra)
        except Exception as e:  # noqa: BLE001 - every check must still report
            print(f"[first_hour] the run with {extra or 'no extra flags'} failed: "
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return [math.nan] * steps

    fp32 = attempt([])
    if use_reference:
        ref = json.loads(reference.read_text())
        if ref["argv"] != run_argv(steps, []):
            print(f"first_hour: {reference} was recorded for another run (argv differs): "
                  "--record-reference on a CPU, or --no-reference", file=sys.stderr)
            raise SystemExit(2)
        where = f"(reference: {ref['device']}, torch {ref['torch']})"
        early = min(EARLY_STEPS, steps)
        verdict(f"fp32 vs CPU reference, steps 1-{early}",
                max_abs(fp32[:early], ref["losses"][:early]), FP32_VS_CPU_EARLY,
                f"max |loss - CPU loss| over the first {early} steps {where}")
        verdict("fp32 vs CPU reference", max_abs(fp32, ref["losses"]), FP32_VS_CPU,
                f"max |loss - CPU loss| over {steps} steps {where}")
    verdict("bf16 vs fp32", max_abs(fp32, attempt(["--bf16"])), BF16_VS_FP32,
            f"max |bf16 loss - fp32 loss| over {steps} steps")
    det = [attempt(["--deterministic"]) for _ in range(2)]
    diff = max_abs(det[0], det[1])
    verdict("determinism", diff, 0.0, "max |difference| of two --deterministic runs")
    results["fp32_losses"] = fp32
    results["torch"] = torch.__version__
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--record-reference", action="store_true")
    g.add_argument("--calibrate", action="store_true")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--no-reference", action="store_true",
                   help="skip check 1 (the reference is for the default --steps only)")
    p.add_argument("--reference", type=Path, default=REFERENCE,
                   help="the recorded CPU losses (default: tools/reference/first_hour_cpu.json)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a directory")
    if not (args.no_reference or args.record_reference or args.calibrate):
        try:
            json.loads(args.reference.read_text())["losses"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--reference {args.reference}: not a recorded reference ({e})")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    if args.record_reference or args.calibrate:
        if _cuda():
            p.error("--record-reference and --calibrate run on the CPU (this machine has CUDA)")
        out = record_reference(args.steps) if args.record_reference else calibrate(args.steps)
        failed = False
    else:
        out = check(args.steps, use_reference=not args.no_reference, reference=args.reference)
        failed = not all(c["pass"] for c in out["checks"].values())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    from megatron_selfroute.parallel.groups import shutdown

    try:  # the runs' process group (NCCL on a GPU), destroyed before the interpreter exits
        shutdown()
    except Exception as e:  # noqa: BLE001 - the results are written; say why the end failed
        print(f"[first_hour] shutting the process group down failed: {type(e).__name__}: {e}")
    return 3 if failed else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
