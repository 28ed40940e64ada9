"""tools/bench_tp.py at the small shape, TP 2: a dense layer's tensor-parallel traffic is exactly
the four activation all-reduces Megatron-LM needs, an MoE layer's (tokens split before routing)
the two attention all-reduces and two all-gathers, plus less than 1% of router statistics."""
import json
import subprocess
import sys

from tests.launch.helpers import ROOT


def test_bench_tp_small(tmp_path):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_tp.py"), "--shape",
                           "small", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["layer"]: r for r in json.loads(out.read_text())["rows"]}
    d, s, b, tp = 128, 128, 4, 2
    act = b * s * d * 4
    assert rows["dense"]["bytes_per_rank"] == 4 * 2 * (tp - 1) / tp * act
    moe = rows["MoE 8 x top-2 self"]
    assert 1.0 <= moe["ratio"] < 1.01, moe
    assert "[bench_tp] small TP 2 dense" in proc.stdout
