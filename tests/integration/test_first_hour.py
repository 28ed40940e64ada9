"""tools/first_hour.py as the GPU report runs it, here on the CPU against a copy of the recorded
CPU reference with step 4's loss moved by 0.005 and step 31's by 0.05: the early-window fp32
check must report step 4's difference (so it reads steps 1-10 and only those) and the 50-step
check step 31's (so the other steps matched within the bounds), both failing with exit status
3, while the bf16 drift and --deterministic checks pass; a file that is not a reference is
refused in one line with exit status 2."""
import json
import subprocess
import sys

from tests.launch.helpers import ROOT

TOOL = ROOT / "tools" / "first_hour.py"


def test_fp32_check_compares_every_step_and_can_fail(tmp_path):
    ref = json.loads((ROOT / "tools" / "reference" / "first_hour_cpu.json").read_text())
    ref["losses"][3] += 0.005
    ref["losses"][30] += 0.05
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(ref))
    out = tmp_path / "fh.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--reference", str(moved), "--json",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = json.loads(out.read_text())["checks"]
    early = checks["fp32 vs CPU reference, steps 1-10"]
    assert not early["pass"] and abs(early["value"] - 0.005) < 5e-4, early
    fp32 = checks["fp32 vs CPU reference"]
    assert not fp32["pass"] and abs(fp32["value"] - 0.05) < 5e-3, fp32
    assert checks["bf16 vs fp32"]["pass"] and 0 < checks["bf16 vs fp32"]["value"] <= 0.05
    assert checks["determinism"] == {"value": 0.0, "bound": 0.0, "pass": True}
    assert "FAIL fp32 vs CPU reference" in proc.stdout and "PASS determinism" in proc.stdout


def test_a_file_that_is_not_a_reference_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    proc = subprocess.run([sys.executable, str(TOOL), "--reference", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert f"--reference {bad}: not a recorded reference" in proc.stderr.strip().splitlines()[-1]
