"""tools/gpu_report.sh as a user runs it, on this CPU machine: SMOKE=1 runs every stage at tiny
shapes and writes the summary table from the real logs; a Python without DeepSpeed is refused
with one line before anything runs."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

from tests.launch.helpers import ROOT


def _env(**extra) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, also on a GPU machine
    env.pop("OUT", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_smoke_run_fills_every_file_and_the_summary(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        ["bash", "tools/gpu_report.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=_env(SMOKE=1, ITERS=4, MBS=2, PYTHON=sys.executable, OUT=out,
                 WHEELS=tmp_path / "no_wheels"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.log", "bench_moe.json", "bench_train.json", "device.txt",
                     "first_hour.json", "gpu_checks.log", "summary.md", "train.log"]
    assert len(files) <= 8  # what a sealed GPU machine's output folder may hand back
    device = (out / "device.txt").read_text()
    ds = importlib.metadata.version("deepspeed")
    assert device.startswith("device: cpu (no CUDA)") and f"deepspeed {ds}" in device, device
    assert "WARNING" not in device  # only the report's own lines
    checks_log = (out / "gpu_checks.log").read_text()
    assert "not run: no CUDA device" in checks_log
    summary = (out / "summary.md").read_text()
    # Each row carries the numbers of its run's last logged interval, read from its section.
    names = {"dense": "dense", "moe": "MoE 8x top-2, self", "moe_loop": "MoE, per-expert loop",
             "dense_compile": "dense, --compile", "moe_compile": "MoE 8x top-2, self, --compile"}
    train = (out / "train.log").read_text()
    for variant, name in names.items():
        section = train.split(f"== train {variant} ==\n")[1].split("\n== train ")[0]
        last = [ln for ln in section.splitlines() if "tokens/s" in ln][-1]
        tps = last.split("tokens/s ")[1].split()[0]
        mfu = last.split("MFU ")[1].split()[0]
        assert f"| GPT-2 small {name} | {tps} |" in summary and f"| {mfu} |" in summary
    for variant in ("dense_compile", "moe_compile"):
        assert "> --compile: " in train.split(f"== train {variant} ==")[1].split("== train")[0]
    # Every pre-registered check has a verdict; the first-hour ones are the tool's own.
    first = json.loads((out / "first_hour.json").read_text())["checks"]
    assert set(first) == {"bf16 vs fp32", "determinism"}  # SMOKE: no reference at 5 steps
    for name, c in first.items():
        assert f"| {name} | {c['value']:.4g} | <= {c['bound']} | " \
               f"{'PASS' if c['pass'] else 'FAIL'} |" in summary
        assert f"{'PASS' if c['pass'] else 'FAIL'} {name}:" in checks_log
    ratio = json.loads((out / "bench_train.json").read_text())["ratio"]
    assert f"| bench_train small MoE: framework / bare loop (median) | {ratio:.4g} |" in summary
    for check in ("MoE MFU (active FLOPs, dense bf16 peak)", "dense: MFU with --compile / eager",
                  "moe: MFU with --compile / eager"):
        assert f"| {check} |" in summary
    assert "checks: " in summary and "pass" in summary
    assert "MoE MFU / dense MFU" in summary
    rows = json.loads((out / "bench_moe.json").read_text())["layer"]["rows"]
    assert rows and all(f"| {r['router']} | {r['dispatcher']} |" in summary for r in rows)
    bench = json.loads((out / "bench_moe.json").read_text())
    assert bench["dtype"] == "bf16" and bench["expert_compute"] == "auto"
    log = (out / "bench.log").read_text()
    assert "expert compute auto" in log and "expert compute loop" in log
    assert "[bench_train] small MoE x1" in log


def test_python_without_deepspeed_is_refused_in_one_line(tmp_path):
    bare = tmp_path / "bare_python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages
    bare.chmod(0o755)
    proc = subprocess.run(
        ["bash", "tools/gpu_report.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=_env(PYTHON=bare, OUT=tmp_path / "report", WHEELS=tmp_path / "no_wheels"))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot import torch" in err[0] and "deepspeed" in err[0], err
    assert not (tmp_path / "report" / "train.log").exists()


def test_no_cuda_without_smoke_is_refused(tmp_path):
    proc = subprocess.run(
        ["bash", "tools/gpu_report.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=_env(PYTHON=sys.executable, OUT=tmp_path / "report", WHEELS=tmp_path / "none"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_report: no CUDA device")
