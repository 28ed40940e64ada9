"""Spawn W gloo processes once and run many named cases in them (start-up costs seconds).

Each rank runs `module.CASES[name](ctx)` for every requested case and records per-case results
(a dict of numbers/strings, or the exception text) as JSON; the parent returns them per case and
rank. One failing case does not stop the others unless it breaks the process group.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from megatron_selfroute.parallel.layout import launcher_env

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(world: int, argv: list[str], log_dir: Path, script: str = "pretrain_gpt.py"
                 ) -> list[subprocess.Popen]:
    """Start `world` ranks of a training script with the env vars torchrun/srun provide, each
    logging to log_dir/rank{r}.log; the caller waits on (or signals) the returned processes."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        env = dict(os.environ, **launcher_env(rank, world, port), OMP_NUM_THREADS="1")
        with open(log_dir / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def spawn(world_size: int, module: str, cases: list[str], out_dir: Path, timeout: float = 300,
          env: dict | None = None) -> dict[str, list[dict]]:
    """Run `cases` of `module` on `world_size` processes; returns {case: [result per rank]}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world_size):
        e = dict(os.environ, **launcher_env(rank, world_size, port), OMP_NUM_THREADS="1",
                 PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        e.update(env or {})
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.harness", module, str(out_dir),
             json.dumps(cases)], cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + timeout
    for p, log in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise AssertionError(f"{module} timed out; logs in {out_dir}") from None
        finally:
            log.close()
    results: dict[str, list[dict]] = {c: [] for c in cases}
    for rank in range(world_size):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            tail = (out_dir / f"rank{rank}.log").read_text()[-3000:]
            raise AssertionError(f"rank {rank} of {module} died:\n{tail}")
        for case, res in json.loads(path.read_text()).items():
            results[case].append(res)
    return results


def argv_cases(env_prefix: str, run, count: int = 64) -> dict:
    """CASES for a worker module whose case i runs `run(argv)`, argv read from env_prefix{i}."""
    def case(name: str):
        return lambda: run(os.environ[name].split("\x1f"))

    return {f"argv{i}": case(f"{env_prefix}{i}") for i in range(count)}


def run_argv_cases(out_dir: Path, world: int, module: str, env_prefix: str,
                   argvs: list[list[str]], timeout: float = 600) -> list[dict]:
    """Parent side: run each argv as one case of `module` in a single `world`-process group;
    returns rank 0's result per argv."""
    env = {f"{env_prefix}{i}": "\x1f".join(a) for i, a in enumerate(argvs)}
    names = [f"argv{i}" for i in range(len(argvs))]
    res = spawn(world, module, names, out_dir, env=env, timeout=timeout)
    return [check(res, n)[0] for n in names]


def check(results: dict[str, list[dict]], case: str) -> list[dict]:
    """Assert every rank passed `case`; return the per-rank results."""
    per_rank = results[case]
    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, f"{case}: {errors[0]}"
    return per_rank


def _worker(module: str, out_dir: str, cases: list[str]) -> None:
    import importlib

    from megatron_selfroute.parallel.groups import shutdown
    from megatron_selfroute.parallel.layout import init_distributed

    init_distributed("gloo", timeout_minutes=2)
    mod = importlib.import_module(module)
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}
    for case in cases:
        try:
            results[case] = mod.CASES[case]() or {}
        except Exception:  # recorded, reported by the parent
            results[case] = {"error": traceback.format_exc(limit=6)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
