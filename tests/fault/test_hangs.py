"""No hangs: when one rank dies (SIGKILL) or stalls (SIGSTOP), every other rank exits non-zero
within a bounded time (--distributed-timeout-minutes; tests use seconds), with a one-line error."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.harness import free_port, launch_ranks
from tests.distributed.train_cases import MOCK, TINY

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MIN = 0.1  # 6 s
ARGS = TINY + MOCK + ["--router-type", "self", "--micro-batch-size", "2", "--train-iters",
                      "100000", "--log-interval", "1", "--distributed-timeout-minutes",
                      str(TIMEOUT_MIN)]



def wait_for_training(log, procs, timeout=120):
    deadline = time.time() + timeout
    while "iteration        3/" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and all(p.poll() is None for p in procs), log.read_text()
        time.sleep(0.2)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_direct_launch_survivors_exit(tmp_path, world, how):
    procs = launch_ranks(world, ARGS, tmp_path)
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


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2"],
    "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"],
}


@pytest.mark.parametrize("launcher,how", [
    ("torchrun", signal.SIGKILL),
    ("deepspeed", signal.SIGKILL),
    pytest.param("torchrun", signal.SIGSTOP, marks=pytest.mark.slow),
    pytest.param("deepspeed", signal.SIGSTOP, marks=pytest.mark.slow),
])
def test_launcher_exits_when_a_rank_dies_or_stalls(tmp_path, launcher, how):
    log_path = tmp_path / "launcher.log"
    log = open(log_path, "w")
    cmd = LAUNCHERS[launcher] + (["--master_port", str(free_port())]
                                 if launcher == "deepspeed" else [])
    proc = subprocess.Popen(cmd + ["pretrain_gpt.py", *ARGS], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    everyone: list = []  # every rank and loader process: torchrun starts them in new sessions
    try:
        wait_for_training(log_path, [proc])
        found = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "pretrain_gpt.py" in " ".join(c.cmdline())
                 and not any(k in " ".join(c.cmdline()) for k in ("distributed.run",
                                                                "deepspeed.launcher"))]
        everyone.extend(found)
        pids = {c.pid for c in found}  # ranks, not their data-loader worker processes
        workers = [c.pid for c in found if c.ppid() not in pids]
        assert len(workers) == 2, (workers, log_path.read_text()[-2000:])
        os.kill(max(workers), how)
        rc = proc.wait(timeout=TIMEOUT_MIN * 60 + 90)
        assert rc != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in everyone:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
