"""No hangs: when one rank dies (SIGKILL) or stalls (SIGSTOP), every other rank exits non-zero
within a bounded time (--distributed-timeout-minutes; tests use seconds), with a one-line error."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.harness import free_port
from tests.distributed.train_cases import MOCK, TINY

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MIN = 0.1  # 6 s
ARGS = TINY + MOCK + ["--router-type", "self", "--micro-batch-size", "2", "--train-iters",
                      "100000", "--log-interval", "1", "--distributed-timeout-minutes",
                      str(TIMEOUT_MIN)]


def start_direct(world, log_dir):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "pretrain_gpt.py", *ARGS], cwd=REPO,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_for_training(log, procs, timeout=120):
    deadline = time.time() + timeout
    while "iteration        3/" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and all(p.poll() is None for p in procs), log.read_text()
        time.sleep(0.2)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_direct_launch_survivors_exit(tmp_path, world, how):
    procs = start_direct(world, tmp_path)
    try:
        wait_for_training(tmp_path / "rank0.log", procs)
        victim = procs[-1]
        t0 = time.time()
        os.kill(victim.pid, how)
        for p in procs[:-1]:
            rc = p.wait(timeout=TIMEOUT_MIN * 60 + 60)
            assert rc != 0
        elapsed = time.time() - t0
        assert elapsed < TIMEOUT_MIN * 60 + 60
        text = (tmp_path / "rank0.log").read_text()
        assert "error: [rank 0] collective communication failed" in text, text[-3000:]
        assert "Traceback" not in text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_torchrun_exits_when_a_rank_dies_or_stalls(tmp_path, how):
    log_path = tmp_path / "torchrun.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "pretrain_gpt.py", *ARGS], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_training(log_path, [proc])
        out = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "pretrain_gpt.py"],
                             capture_output=True, text=True).stdout.split()
        assert len(out) == 2, out
        os.kill(int(sorted(out, key=int)[-1]), how)
        rc = proc.wait(timeout=TIMEOUT_MIN * 60 + 90)
        assert rc != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"MASTER_PORT.*{proc.pid}"], check=False)
