"""tools/sweep.py end to end at a tiny size: 2 rows x 2 seeds through the row scripts, a local
lm-eval task and the routing analysis; the table's means, intervals and paired differences equal
a recomputation from the per-run JSONs here (scipy's t interval, not the tool's formula); rows of
one seed start from identical shared parameters and read identical batches (and seeds differ);
a re-run skips every finished run and writes the same table; the PNGs are valid."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
from scipy import stats

from tests.integration.helpers import ROOT
from tests.launch.helpers import launch_env
from tests.scratch import module_dir

ROWS, SEEDS = ["self", "learned"], [0, 1]
PNG = b"\x89PNG\r\n\x1a\n"


def sweep(tmp_path, prefix, *extra):
    env_flags = ["--env", f"DATA_PATH={prefix}", "TRAIN_ITERS=6", "EVAL_ITERS=1",
                 "LOG_INTERVAL=2", "SPLIT=95,5,0"]
    cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--rows", *ROWS, "--seeds",
           *map(str, SEEDS), "--scale", "tiny", "--out-dir", str(tmp_path / "sweep"),
           "--eval-tokens", "512", "--tasks", "shakespeare_last_word", "--tasks-dir",
           str(ROOT / "examples" / "tasks"), "--eval-limit", "3", "--routing-data", prefix,
           "--routing-tokens", "1024", *env_flags, *extra]
    env = launch_env(HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1, HF_HOME=tmp_path / "hf",
                     DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def swept(request, shakespeare_prefix):
    tmp = module_dir(request, "sweep")
    first = sweep(tmp, shakespeare_prefix)
    table_md = (tmp / "sweep" / "table" / "table.md").read_text()
    second = sweep(tmp, shakespeare_prefix)
    return tmp / "sweep", first, second, table_md


def _run(root, row, seed):
    d = root / "tiny" / f"seed{seed}" / row
    summary = json.loads((d / "summary.json").read_text())
    ev = json.loads((d / "eval.json").read_text())
    routing = json.loads((d / "routing" / "routing.json").read_text())[0]
    return summary, ev, routing


def _ci(values):
    mean = statistics.mean(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean,
                                 scale=statistics.stdev(values) / math.sqrt(len(values)))
    return mean, low, high


def test_table_equals_a_recomputation(swept):
    root, _, _, _ = swept
    table = json.loads((root / "table" / "table.json").read_text())
    per = {}
    for row in ROWS:
        for seed in SEEDS:
            summary, ev, routing = _run(root, row, seed)
            last = max(int(k) for k in summary["valid_loss"])
            task = next(r for r in ev["summary"] if r["task"] == "shakespeare_last_word")
            per[(row, seed)] = {"valid_loss": summary["valid_loss"][str(last)],
                                "mean_normalized_entropy": routing["mean_normalized_entropy"],
                                "mean_max_fraction": routing["mean_max_fraction"],
                                f"shakespeare_last_word/{task['metric']}": task["value"],
                                "tokens_per_sec": summary["tokens_per_sec"]}
            assert sorted(int(k) for k in summary["valid_loss"]) == [2, 4, 6]  # 512-token steps
    rows = {e["row"]: e for e in table["rows"]}
    for row in ROWS:
        for key in per[(row, 0)]:
            mean, low, high = _ci([per[(row, s)][key] for s in SEEDS])
            got = rows[row]["metrics"][key]
            assert got["n"] == 2
            assert got["mean"] == pytest.approx(mean, rel=1e-12)
            assert got["low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
            assert got["high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
    (pair,) = table["pairs"]
    a, b = pair["a"], pair["b"]
    for key, got in pair["metrics"].items():
        if key not in per[(a, 0)]:
            continue
        mean, low, high = _ci([per[(a, s)][key] - per[(b, s)][key] for s in SEEDS])
        assert got["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert got["low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
        assert got["differs"] == (low > 0 or high < 0)
    assert "valid_loss" in pair["metrics"] and "mean_normalized_entropy" in pair["metrics"]


def test_rows_of_a_seed_share_init_and_batches(swept):
    root, _, _, _ = swept
    s0 = {row: _run(root, row, 0)[0] for row in ROWS}
    s1 = _run(root, "self", 1)[0]
    assert s0["self"]["data_digest"] == s0["learned"]["data_digest"] != s1["data_digest"]
    shared = set(s0["self"]["init_digest"]) & set(s0["learned"]["init_digest"])
    assert any("deepspeed_experts" in n for n in shared) and "transformer.wte.weight" in shared
    for name in shared:
        assert s0["self"]["init_digest"][name] == s0["learned"]["init_digest"][name], name
    assert s0["self"]["init_digest"]["transformer.wte.weight"] != \
        s1["init_digest"]["transformer.wte.weight"]
    assert not set(s0["learned"]["init_digest"]) - shared - {
        f"transformer.h.{i}.mlp.router.weight" for i in range(2)}
    table = json.loads((root / "table" / "table.json").read_text())
    for check in table["pairing"].values():
        assert check["same_batches"] and check["same_shared_init"]


def test_rerun_skips_and_gives_the_same_table(swept):
    root, first, second, table_md = swept
    assert first.count("train") >= 4 and "done, skipped" not in first
    assert second.count("done, skipped") == 4
    assert (root / "table" / "table.md").read_text() == table_md
    assert "Paired differences" in table_md and "| tiny | learned |" in table_md


def test_figures_are_pngs(swept):
    root = swept[0]
    for name in ("fig2_entropy.png", "fig3_expert_fractions.png", "fig4_max_fraction.png",
                 "valid_loss.png"):
        assert (root / "table" / name).read_bytes()[:8] == PNG, name


def test_dry_run_prints_every_command(tmp_path, shakespeare_prefix):
    out = sweep(tmp_path, shakespeare_prefix, "--dry-run")
    lines = out.strip().splitlines()
    assert len(lines) == 2 * 2 * 3  # train, eval, routing per run
    assert sum("examples/gpt2/self.sh --seed 1" in line for line in lines) == 1
    assert not (tmp_path / "sweep").exists()


def test_aggregates_runs_made_elsewhere(swept, tmp_path):
    """Row directories as a cluster leaves them (summary.json and the evaluations, no done.json:
    the row scripts' layout OUT_DIR/<row>/) aggregate with --aggregate-only --runs; their scale
    is the model shape."""
    import shutil

    root = swept[0]
    for seed in SEEDS:
        for row in ROWS:
            dst = tmp_path / "cluster" / f"seed{seed}" / row
            shutil.copytree(root / "tiny" / f"seed{seed}" / row, dst,
                            ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
            (dst / "done.json").unlink()
    cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--aggregate-only", "--runs",
           str(tmp_path / "cluster"), "--out-dir", str(tmp_path / "agg")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((tmp_path / "agg" / "table" / "table.json").read_text())
    local = json.loads((root / "table" / "table.json").read_text())
    assert {(e["scale"], e["row"]) for e in table["rows"]} == {("L2-H64-S64", r) for r in ROWS}
    for e, ref in zip(sorted(table["rows"], key=lambda e: e["row"]),
                      sorted(local["rows"], key=lambda e: e["row"]), strict=True):
        assert e["metrics"] == ref["metrics"]  # the same numbers as the local table
