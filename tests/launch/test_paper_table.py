"""examples/paper_table.sh at its tiny default (CPU, Shakespeare): trains all five rows, evaluates
them on the shipped local tasks, analyses routing, and prints one row per router (minutes: slow)."""
from __future__ import annotations

import csv
import json

import pytest

from tests.launch.helpers import ROOT, ROWS, launch_env, run_checked


@pytest.mark.slow
def test_paper_table_tiny_default(tmp_path):
    out = tmp_path / "out"
    text = run_checked(["bash", str(ROOT / "examples/paper_table.sh")],
                       launch_env(OUT_DIR=out, GPUS_PER_NODE=1),
                       tmp_path / "paper_table.out", timeout=3600)
    check_outputs(text, out)


def check_outputs(text: str, out) -> None:
    """One table row per router on stdout; the same in CSV/JSON; the routing figures."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| router |"))
    table = [line for line in lines[start:] if line.startswith("| ")]
    assert table[0].startswith("| router | shakespeare_next_line acc |"), table[0]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ROWS
    with open(out / "paper_table.csv") as f:
        rows = {r["router"]: r for r in csv.DictReader(f)}
    assert list(rows) == ROWS
    assert rows["dense"]["mean normalised entropy"] == ""
    for row in ROWS[1:]:
        assert 0 < float(rows[row]["mean normalised entropy"]) <= 1
        assert 1 / 8 <= float(rows[row]["mean max-expert fraction"]) <= 1
    assert float(rows["random"]["mean normalised entropy"]) > 0.95  # content-independent
    for row in ROWS:
        assert 0 <= float(rows[row]["shakespeare_next_line acc"]) <= 1
        assert float(rows[row]["shakespeare_passages word_perplexity"]) > 1
    assert json.loads((out / "paper_table.json").read_text())[0]["router"] == "dense"
    for name in ("routing.json", "routing.csv", "entropy.png", "max_fraction.png"):
        assert (out / "routing" / name).exists()
    assert len(list((out / "routing").glob("heatmap_*.png"))) == 4


@pytest.mark.slow
def test_small_table(tmp_path):
    """SCALE=small: 5 rows x 3 seeds through the sweep (tens of minutes on 2 cores): every run
    finished, the table holds every row with n = 3 and every pair, the pairing checks hold, the
    random router is the most uniform, and the figures are PNGs."""
    out = tmp_path / "out"
    text = run_checked(["bash", str(ROOT / "examples/paper_table.sh")],
                       launch_env(SCALE="small", SEEDS="0 1 2", OUT_DIR=out),
                       tmp_path / "small.out", timeout=5400)
    assert "phase times (s)" in text
    table = json.loads((out / "table" / "table.json").read_text())
    rows = {e["row"]: e for e in table["rows"]}
    assert sorted(rows) == sorted(ROWS) and all(e["seeds"] == [0, 1, 2] for e in rows.values())
    assert len(table["pairs"]) == 10
    assert all(c["same_batches"] and c["same_shared_init"] for c in table["pairing"].values())
    ent = {r: rows[r]["metrics"]["mean_normalized_entropy"]["mean"] for r in ROWS if r != "dense"}
    assert max(ent, key=ent.get) == "random" and ent["random"] > 0.95
    for name in ("fig2_entropy.png", "fig3_expert_fractions.png", "fig4_max_fraction.png",
                 "valid_loss.png"):
        assert (out / "table" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
