#!/usr/bin/env python
"""summary.md of a GPU report from the files tools/gpu_report.sh wrote to OUT: the last logged
interval of each GPT-2 small run (the first includes warm-up), the MoE layer bench, and every
pre-registered check as PASS/FAIL (a check whose stage did not run reads n/a, FAIL).
gpu_report.sh runs it last; it also runs by hand on the files a cut-short report brought back:

    python tools/gpu_summary.py runs/gpu_report        # add 1 for a SMOKE report (tiny shapes)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAMES = {"dense": "dense", "moe": "MoE 8x top-2, self", "moe_loop": "MoE, per-expert loop",
         "dense_compile": "dense, --compile", "moe_compile": "MoE 8x top-2, self, --compile"}


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def training_rows(out: Path) -> dict:
    """Print the runs' table; return each run's MFU (None when not reported)."""
    sections = re.split(r"^== train (\S+) ==$", _read(out / "train.log"), flags=re.M)
    logs = dict(zip(sections[1::2], sections[2::2], strict=True))
    print("| run | tokens/s | TFLOP/s per GPU | MFU |\n| --- | --- | --- | --- |")
    mfu = {}
    for v, name in NAMES.items():
        lines = [line for line in logs.get(v, "").splitlines() if "tokens/s" in line]
        if not lines:
            print(f"| GPT-2 small {name} | no logged interval (see train.log) | | |")
            continue
        last = lines[-1]
        tps = re.search(r"tokens/s (\d+)", last).group(1)
        tfl = re.search(r"TFLOP/s/device ([0-9.]+)", last).group(1)
        m = re.search(r"MFU ([0-9.]+)%", last)
        mfu[v] = float(m.group(1)) / 100 if m else None
        print(f"| GPT-2 small {name} | {tps} | {tfl} | {m.group(1) + '%' if m else 'n/a'} |")
    if mfu.get("dense") and mfu.get("moe") is not None:
        print(f"\nMoE MFU / dense MFU: {mfu['moe'] / mfu['dense']:.2f}")
    return mfu


def bench_rows(out: Path) -> None:
    bench = out / "bench_moe.json"
    if not bench.exists():
        return
    rows = json.loads(bench.read_text())["layer"]["rows"]
    print("\n| router | dispatcher | max frac | time/limit (median) | mem/limit |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['router']} | {r['dispatcher']} | {r['max_fraction']:.2f} | "
              f"{r['time_ratio_median']:.2f} | {r['memory_ratio']:.2f} |")


def checks(out: Path, mfu: dict) -> list[dict]:
    """Pre-registered checks (bounds fixed before any GPU run; SMOKE: the script, not the
    numbers)."""
    rows = []

    def verdict(name, value, op, bound):
        ok = value is not None and (value <= bound if op == "<=" else value >= bound)
        rows.append({"check": name, "value": value, "bound": f"{op} {bound}", "pass": ok})

    first = out / "first_hour.json"
    if first.exists():
        for name, c in json.loads(first.read_text())["checks"].items():
            verdict(name, c["value"], "<=", c["bound"])
    else:
        rows.append({"check": "first-hour numerics", "value": None, "bound": "ran",
                     "pass": False})
    bt = out / "bench_train.json"
    verdict("bench_train small MoE: framework / bare loop (median)",
            json.loads(bt.read_text())["ratio"] if bt.exists() else None, "<=", 1.05)
    verdict("MoE MFU (active FLOPs, dense bf16 peak)", mfu.get("moe"), ">=", 0.40)
    for v in ("dense", "moe"):
        if mfu.get(v) and mfu.get(f"{v}_compile") is not None:
            verdict(f"{v}: MFU with --compile / eager", mfu[f"{v}_compile"] / mfu[v], ">=", 1.0)
        else:
            verdict(f"{v}: MFU with --compile / eager", None, ">=", 1.0)
    return rows


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2 or not Path(argv[0]).is_dir():
        print("usage: gpu_summary.py OUT_DIR [SMOKE (1 or 0)]", file=sys.stderr)
        return 2
    out, smoke = Path(argv[0]), argv[1:] == ["1"]
    device = _read(out / "device.txt").strip().replace("\n", " | ") or "unknown (no device.txt)"
    print(f"GPU report: {device}\n")
    mfu = training_rows(out)
    bench_rows(out)
    rows = checks(out, mfu)
    print("\n| check | value | bound | verdict |\n| --- | --- | --- | --- |")
    for c in rows:
        value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
        print(f"| {c['check']} | {value} | {c['bound']} | {'PASS' if c['pass'] else 'FAIL'} |")
    passed = sum(c["pass"] for c in rows)
    print(f"\nchecks: {passed}/{len(rows)} pass" + (" (SMOKE: tiny shapes, the verdicts test the "
          "script only)" if smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
