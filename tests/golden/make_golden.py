"""Record the golden runs and the pre-refactor checkpoint assets (run once, on the reference
commit; see runs.py): `python -m tests.golden.make_golden`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.distributed.harness import run_argv_cases
from tests.golden.runs import checksums, gpt_runs, vit_runs
from tests.vision.conftest import make_image_folder

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "assets" / "ckpt_pre_layout"


def run_group(world: int, runs: dict[str, list[str]], tmp: Path) -> dict[str, dict]:
    """Run every (script, argv) of `runs` in one `world`-process group; name -> summary."""
    names = list(runs)
    argvs = []
    for name in names:
        script, *argv = runs[name]
        argvs.append([script, *argv, "--save", str(tmp / "save" / name)])
    results = run_argv_cases(tmp / f"logs{world}", world, "tests.golden.cases",
                             "MSR_GOLDEN_ARGV", argvs, timeout=1800)
    out = {}
    for name, res in zip(names, results, strict=True):
        out[name] = {"argv": runs[name][1:], "losses": res["losses"], "valid": res["valid"],
                     "checksums": checksums(tmp / "save" / name)}
    return out


def all_runs(world: int, image_root: str) -> dict[str, list[str]]:
    runs = {n: ["gpt", *a] for n, a in gpt_runs(world).items()}
    runs.update({n: ["vit", *a] for n, a in vit_runs(world, image_root).items()})
    return runs


ASSET_RUNS = {
    # name: (world, script, argv): a straight 4-step run and a run that saves at step 2
    "gpt_ep2_zero2_learned": (2, "gpt", ["--micro-batch-size", "1", "--global-batch-size", "4",
                                         "--zero-stage", "2", "--expert-model-parallel-size",
                                         "2", "--num-experts", "4", "--router-type",
                                         "learned"]),
    "gpt_1proc_fixed_random": (1, "gpt", ["--micro-batch-size", "2", "--global-batch-size",
                                          "4", "--num-experts", "4", "--router-type",
                                          "fixed-random"]),
    "vit_1proc_self": (1, "vit", ["--batch-size", "4", "--global-batch-size", "8",
                                  "--num-experts", "4", "--router-type", "self"]),
}


def asset_argv(script: str, argv: list[str], image_root: str) -> list[str]:
    """The full argv of an asset run (4 steps) on the tiny model of runs.py."""
    from tests.golden.runs import GPT_TINY, VIT_TINY

    base = GPT_TINY if script == "gpt" else VIT_TINY + ["--data-path", image_root]
    at = base.index("--train-iters") + 1
    return base[:at] + ["4"] + base[at + 1:] + argv


def make_assets(tmp: Path, image_root: str) -> dict:
    """Train each asset run straight to step 4 and, separately, to step 2 with --save; keep
    the step-2 checkpoint as a test asset and record the straight run's losses."""
    meta = {}
    for world in (1, 2):
        names = [n for n, (w, _, _) in ASSET_RUNS.items() if w == world]
        argvs = []
        for name in names:
            _, script, argv = ASSET_RUNS[name]
            full = asset_argv(script, argv, image_root)
            argvs += [[script, *full], [script, *full, "--save", str(tmp / "assets" / name),
                                        "--exit-interval", "2"]]
        results = run_argv_cases(tmp / f"asset_logs{world}", world, "tests.golden.cases",
                                 "MSR_GOLDEN_ARGV", argvs, timeout=1800)
        for i, name in enumerate(names):
            _, script, argv = ASSET_RUNS[name]
            straight, first = results[2 * i], results[2 * i + 1]
            assert first["iteration"] == 2, first
            meta[name] = {"world": world, "script": script, "argv": argv,
                          "straight_losses": straight["losses"],
                          "straight_valid": straight["valid"]}
            dest = ASSETS / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(tmp / "assets" / name, dest)
    return meta


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        image_root = str(make_image_folder(tmp / "images"))
        golden = {"commit": commit, "runs": {}}
        for world in (1, 2):
            golden["runs"].update(run_group(world, all_runs(world, image_root), tmp))
            print(f"world {world}: done", file=sys.stderr)
        # the image root is a temporary path: store the placeholder
        for run in golden["runs"].values():
            run["argv"] = ["IMAGES" if a == image_root else a for a in run["argv"]]
        (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
        ASSETS.mkdir(parents=True, exist_ok=True)
        meta = make_assets(tmp, image_root)
        meta = {"commit": commit, "assets": meta}
        (ASSETS / "assets.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
