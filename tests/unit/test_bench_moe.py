"""tools/bench_moe.py runs and its byte counts hold: the padding-free all-to-all sends only the rows
that must move (plus the count exchange), DeepSpeed's padded buffers send more under imbalance."""
import json
import subprocess
import sys
from pathlib import Path

from megatron_selfroute.moe.router import BUILTIN_ROUTERS

REPO = Path(__file__).resolve().parents[2]


def test_bench_moe_small(tmp_path):
    r = subprocess.run([sys.executable, "tools/bench_moe.py", "--tokens", "128", "--hidden", "32",
                        "--ffn", "64", "--reps", "2", "--imbalance", "0.13", "0.49", "--world",
                        "2", "--json", str(tmp_path / "b.json")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "time/limit" in r.stdout
    out = json.loads((tmp_path / "b.json").read_text())
    rows = out["layer"]["rows"]
    assert {r["router"] for r in rows} == set(BUILTIN_ROUTERS)
    fracs = sorted(r["max_fraction"] for r in rows if r["dispatcher"] == "deepspeed")
    assert fracs[0] < 0.25 and abs(fracs[1] - 0.49) < 0.03  # 256 slots: near-uniform is noisy
    vol = {(v["dispatcher"], v["max_fraction"]): v for v in out["volume"]}
    for frac in (0.13, 0.49):
        a2a = vol[("alltoall", frac)]
        assert 1.0 <= a2a["volume_ratio"] <= 1.05, a2a
    assert vol[("deepspeed", 0.49)]["volume_ratio"] > 2.0
