"""Spawn W gloo processes once and run many named cases in them (start-up costs seconds).

Each rank runs `module.CASES[name](ctx)` for every requested case and records per-case results
(a dict of numbers/strings, or the exception text) as JSON; the parent returns them per case and
rank. One failing case does not stop the others unless it breaks the process group.

The ranks are forked from one `multiprocessing` fork server per test session that has imported
torch, torch._dynamo, DeepSpeed and the trainer once (`_PRELOAD`): a fresh interpreter spends
about 6 s of CPU on those imports alone, more than a tiny case's whole run, and the suite starts
well over a hundred ranks. Each rank still is its own process with its own environment (set
before any case runs), working directory, log file and gloo process group; the paths a user
runs (`pretrain_gpt.py`, torchrun, the DeepSpeed launcher, the tools) are started as fresh
processes by `launch_ranks` and the launch and CLI tests. Set MSR_TEST_FRESH_RANKS=1 to start
every rank as a fresh interpreter instead (`python -m tests.distributed.harness`).
"""
from __future__ import annotations

import json
import multiprocessing
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
    fresh = os.environ.get("MSR_TEST_FRESH_RANKS") == "1"
    procs = []
    for rank in range(world_size):
        e = dict(os.environ, **launcher_env(rank, world_size, port), OMP_NUM_THREADS="1",
                 PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        e.update(env or {})
        log_path = out_dir / f"rank{rank}.log"
        if fresh:
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.distributed.harness", module, str(out_dir),
                     json.dumps(cases)], cwd=ROOT, env=e, stdout=log,
                    stderr=subprocess.STDOUT))
        else:
            p = _forkserver().Process(target=_forked_rank,
                                      args=(e, str(log_path), module, str(out_dir), cases))
            p.start()
            procs.append(p)
    deadline = time.time() + timeout
    for p in procs:
        if _wait(p, max(1, deadline - time.time())):
            continue
        for q in procs:
            q.kill()
        raise AssertionError(f"{module} timed out; logs in {out_dir}")
    results: dict[str, list[dict]] = {c: [] for c in cases}
    for rank in range(world_size):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            tail = (out_dir / f"rank{rank}.log").read_text()[-3000:]
            raise AssertionError(f"rank {rank} of {module} died:\n{tail}")
        for case, res in json.loads(path.read_text()).items():
            results[case].append(res)
    return results


# What the fork server imports once; the ranks it forks find these modules loaded.
_PRELOAD = ["torch", "torch._dynamo", "deepspeed", "megatron_selfroute.training.loop",
            "pretrain_gpt", "pretrain_vit", "tests.distributed.train_cases"]


def _forkserver():
    """The session's fork server, multiprocessing's own singleton (started on first use, in this
    process's environment: the test-wide one of tests/conftest.py, e.g. OMP_NUM_THREADS and
    DS_ACCELERATOR, which torch and DeepSpeed read when imported; the preload list only matters
    before that start)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _wait(p, timeout: float) -> bool:
    """Whether `p` (a Popen or a multiprocessing Process) ended within `timeout` seconds."""
    if isinstance(p, subprocess.Popen):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    p.join(timeout)
    return p.exitcode is not None


def _forked_rank(env: dict, log_path: str, module: str, out_dir: str, cases: list[str]) -> None:
    """A forked rank: the environment, working directory and log a fresh process would have
    had, then the cases."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # the platform's default start method again (the fork server's children inherit its own):
    # the DataLoader's workers start as they would in a fresh process
    multiprocessing.set_start_method(None, force=True)
    import torch

    # the rank's thread count, not the one the server imported torch with
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    _worker(module, out_dir, cases)


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
