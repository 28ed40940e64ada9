"""tools/bench_train.py end to end at its small shape, one round: it runs both sides on the same
model object and writes a report whose numbers are consistent (timings are not asserted: speed
goals are read from the benchmark's printed ratios, not from tests). It runs as `--repeat 2`: two
fresh processes, each report checked, and the summary checked against them by hand."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def check_process_report(rep):
    assert rep["moe"] and rep["world"] == 1 and rep["extra_flags"] == ["--num-layers", "1"]
    assert rep["framework_ms"] > 0 and rep["bare_ms"] > 0
    assert rep["ratio"] == rep["framework_ms"] / rep["bare_ms"]
    assert rep["ratio_p10"] <= rep["ratio_p90"]
    low, high = rep["ratio_ci95"]  # the bootstrap interval of the ratio, ordered
    assert 0 < low <= high
    parts = rep["framework_parts_ms"]
    assert {"data", "forward", "backward", "optimizer", "bookkeeping"} <= set(parts)
    assert sum(parts.values()) >= rep["framework_ms"] * 0.999  # bookkeeping = the rest


def test_bench_train_reports_framework_and_bare_steps(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tools/bench_train.py", "--moe", "--rounds", "2",
                        "--steps", "2", "--warmup", "1", "--repeat", "2", "--json", str(out),
                        "--", "--num-layers", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    procs = rep["processes"]
    assert rep["repeat"] == 2 and len(procs) == 2
    for proc in procs:
        check_process_report(proc)
        assert proc["rounds"] == 2 and proc["steps"] == 2
    ratios = [p["ratio"] for p in procs]
    assert rep["ratio"] == (ratios[0] + ratios[1]) / 2  # the median of two
    assert (rep["ratio_min"], rep["ratio_max"]) == (min(ratios), max(ratios))
    assert rep["framework_ms"] == statistics.median(p["framework_ms"] for p in procs)
    assert r.stdout.count("[bench_train] round 2/2") == 2
    assert "[bench_train] process 2/2" in r.stdout and "2 processes: ratio median" in r.stdout


def test_bench_train_repeat_refusals():
    for argv, env, words in ((["--repeat", "0"], {}, "--repeat must be >= 1"),
                             (["--repeat", "2"], {"WORLD_SIZE": "2"}, "under torchrun")):
        r = subprocess.run([sys.executable, "tools/bench_train.py", *argv], cwd=REPO,
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, **env))
        assert r.returncode == 2 and words in r.stderr, r.stderr
