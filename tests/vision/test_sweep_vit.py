"""The Table 2 comparison through the sweep on the bundled digits (slow: minutes on 2 cores):
dense, learned and self with two seeds: a pipeline check (above chance, not a result)."""
from __future__ import annotations

import json

import pytest

from tests.launch.helpers import ROOT, launch_env, run_checked


@pytest.mark.slow
def test_digits_table(tmp_path):
    out = tmp_path / "out"
    text = run_checked(["bash", str(ROOT / "examples/sweep.sh")],
                       launch_env(FAMILY="vit", SEEDS="0 1", OUT_DIR=out,
                                  IMAGE_ROOT=tmp_path / "digits"),
                       tmp_path / "vit.out", timeout=3600)
    assert "phase times (s)" in text
    table = json.loads((out / "table" / "table.json").read_text())
    rows = {e["row"]: e for e in table["rows"]}
    assert sorted(rows) == ["dense", "learned", "self"]
    for e in rows.values():
        assert e["seeds"] == [0, 1] and e["metrics"]["valid_top1"]["mean"] > 20  # > chance (10)
    assert "mean_normalized_entropy" in rows["self"]["metrics"]
    assert all(c["same_batches"] and c["same_shared_init"] for c in table["pairing"].values())
