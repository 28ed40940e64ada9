"""Numerics and checkpoint compatibility across refactors (issue 14).

The golden runs of runs.py (every router and dense; GPT and ViT; 1 process, and 2 processes with
EP=2 and ZeRO-2) were recorded by make_golden.py on commit 7fd371d, before the layout refactor;
this code must reproduce their per-iteration losses (rtol 1e-6) and final weights (per-tensor
sums, rtol 1e-5) with threads pinned to 1. Checkpoints written by that commit
(tests/assets/ckpt_pre_layout) must still resume exactly (the resumed steps equal the
uninterrupted run recorded then) and convert to the consolidated format with every tensor intact.
`MSR_GOLDEN_EXACT=1` demands bit-for-bit equality instead (true on the machines that recorded
them: golden.json on the first session's machine, golden_amx.json on an AMX Xeon, 2026-12-02;
on each, the code reproduces 7fd371d bit for bit). A run passes when it matches one machine's set.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_argv_cases
from tests.golden.runs import checksums, gpt_runs, read_weights, vit_runs
from tests.integration.helpers import run_tool

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "assets" / "ckpt_pre_layout"
# One golden set per machine type, each recorded from commit 7fd371d's code: fp32 CPU kernels
# (oneDNN/MKL on AVX2, AVX-512, AMX) sum in different orders, so a tiny model's weights after a few
# Adam steps differ between machine types by more than the tolerance (up to 2e-4 relative on
# bias sums), while each machine reproduces 7fd371d bit for bit. A run must match one set.
GOLDEN_SETS = {path.stem: json.loads(path.read_text())["runs"]
               for path in sorted(HERE.glob("golden*.json"))}
GOLDEN = GOLDEN_SETS["golden"]
ASSET_META = json.loads((ASSETS / "assets.json").read_text())["assets"]


def _asset_argv(name: str, image_root: str, ckpt: Path) -> list[str]:
    from tests.golden.make_golden import asset_argv

    meta = ASSET_META[name]
    return [meta["script"], *asset_argv(meta["script"], meta["argv"], image_root),
            "--load", str(ckpt), "--save", str(ckpt)]


@pytest.fixture(scope="module")
def golden_results(tmp_path_factory, image_root):
    """Every golden run and every asset resume, one process group per world size."""
    tmp = tmp_path_factory.mktemp("golden")
    out = {}
    for world in (1, 2):
        runs = {n: ["gpt", *a] for n, a in gpt_runs(world).items()}
        runs.update({n: ["vit", *a] for n, a in vit_runs(world, str(image_root)).items()})
        names = list(runs)
        argvs = [runs[n] + ["--save", str(tmp / "save" / n)] for n in names]
        for name, meta in ASSET_META.items():
            if meta["world"] == world:
                ckpt = tmp / "assets" / name
                shutil.copytree(ASSETS / name, ckpt)
                names.append(f"asset/{name}")
                argvs.append(_asset_argv(name, str(image_root), ckpt))
        results = run_argv_cases(tmp / f"logs{world}", world, "tests.golden.cases",
                                 "MSR_GOLDEN_ARGV", argvs, timeout=1200)
        out.update(zip(names, results, strict=True))
    return out, tmp


EXACT = os.environ.get("MSR_GOLDEN_EXACT") == "1"  # bit-for-bit, on the recording machine


def _close(a: float, b: float, rtol: float, scale: float = 0.0) -> bool:
    if EXACT:
        return a == b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * scale)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_run_matches(golden_results, name):
    results, tmp = golden_results
    sums = checksums(tmp / "save" / name)
    failures = {}
    for machine, runs in GOLDEN_SETS.items():
        try:
            _matches(runs[name], results[name], sums, name)
            return
        except AssertionError as e:
            failures[machine] = e
    raise AssertionError(f"{name} matches no golden set: "
                         + "; ".join(f"{m}: {e}" for m, e in failures.items()))


def _matches(want: dict, got: dict, sums: dict, name: str) -> None:
    assert set(got["losses"]) == set(want["losses"]), (got["losses"], want["losses"])
    for it, loss in want["losses"].items():
        assert _close(got["losses"][it], loss, 1e-6), (name, it, got["losses"][it], loss)
    assert set(got["valid"]) == set(want["valid"])
    for it, loss in want["valid"].items():
        assert _close(got["valid"][it], loss, 1e-6), (name, it, got["valid"][it], loss)
    assert set(sums) == set(want["checksums"]), sorted(set(sums) ^ set(want["checksums"]))
    for tensor, (total, abs_total) in want["checksums"].items():
        g_total, g_abs = sums[tensor]
        assert _close(g_abs, abs_total, 1e-5), (name, tensor, g_abs, abs_total)
        assert _close(g_total, total, 1e-5, abs_total), (name, tensor, g_total, total)


@pytest.mark.parametrize("name", sorted(ASSET_META))
def test_pre_refactor_checkpoint_resumes_exactly(golden_results, name):
    got = golden_results[0][f"asset/{name}"]
    meta = ASSET_META[name]
    assert sorted(got["losses"], key=int) == ["3", "4"], got
    for it, loss in got["losses"].items():
        assert _close(loss, meta["straight_losses"][it], 1e-6), (it, loss, meta)
    for it, loss in got["valid"].items():
        assert _close(loss, meta["straight_valid"][it], 1e-6), (it, loss, meta)


@pytest.mark.parametrize("name", [n for n in sorted(ASSET_META) if n.startswith("gpt")])
def test_pre_refactor_checkpoint_converts(tmp_path, name):
    out = tmp_path / "consolidated"
    run_tool("checkpoint/convert.py", "--input", str(ASSETS / name), "--output", str(out),
             "--to", "consolidated")
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    want = read_weights(ASSETS / name)
    want.pop("lm_head.weight", None)  # tied: stored once as transformer.wte.weight
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, t in want.items():
        assert torch.equal(got[k], t), k
