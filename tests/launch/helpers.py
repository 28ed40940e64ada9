"""Running the launch scripts from tests: a clean launch environment, dry-run parsing, processes
that are always cleaned up (with every descendant, by pid), free ports."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(__file__).resolve().parent / "bin"
ROWS = ["dense", "learned", "self", "fixed_random", "random"]
ROUTER_TYPE = {"learned": "learned", "self": "self", "fixed_random": "fixed-random",
               "random": "random"}

# Every knob the scripts read: a test sets the ones it means, never inherits them.
KNOBS = ["SCALE", "ROW", "ROWS", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "EP", "DATA_PATH",
         "OUT_DIR", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN", "PYTHON", "TRAIN_ITERS",
         "GLOBAL_BATCH", "MICRO_BATCH", "LR", "MIN_LR", "WARMUP", "ZERO_STAGE", "SPLIT",
         "LOG_INTERVAL", "EVAL_INTERVAL", "EVAL_ITERS", "SAVE_INTERVAL", "HOSTFILE", "HOSTS",
         "DS_LAUNCHER", "SSH_PORT", "EXPORT_VARS", "DS_ENV_FILE", "RDZV_ID", "MSR_ROOT",
         "SRUN_ARGS", "TASKS", "TASKS_DIR", "EVAL_LIMIT", "EVAL_BATCH", "EVAL_DEVICE",
         "ROUTING_DATA_PATH", "ROUTING_TOKENS", "SKIP_TRAIN", "CUDA_VISIBLE_DEVICES"]


def launch_env(bin_first: bool = False, **knobs: object) -> dict:
    """os.environ without any launch knob or SLURM_* variable, plus `knobs`; PYTHON is this
    test interpreter unless a knob sets it (the project may live in an environment that is not
    ./.venv and not activated)."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM")}
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in knobs.items()})
    if bin_first:
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def dry_run(script: str, *args: str, **knobs: object) -> list[list[str]]:
    """The commands `DRY_RUN=1 bash script args` prints (comment lines dropped), as argv lists."""
    proc = subprocess.run(["bash", str(ROOT / script), *args], env=launch_env(DRY_RUN=1, **knobs),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def trainer_argv(cmd: list[str]) -> list[str]:
    """The arguments after pretrain_gpt.py."""
    i = next(i for i, a in enumerate(cmd) if a.endswith("pretrain_gpt.py"))
    return cmd[i + 1:]


def flags(argv: list[str]) -> dict[str, object]:
    """{--flag: value or True}; a flag given twice keeps its last value (as argparse does)."""
    out: dict[str, object] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        assert a.startswith("--"), (a, argv)
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a] = argv[i + 1]
            i += 2
        else:
            out[a] = True
            i += 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """A script started in its own session; `stop()` ends it and every descendant, by pid."""

    def __init__(self, cmd: list[str], env: dict, log: Path, cwd: Path = ROOT):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._seen: dict[int, psutil.Process] = {}

    def _snapshot(self) -> None:
        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout: float) -> int:
        end = time.time() + timeout
        while self.proc.poll() is None and time.time() < end:
            self._snapshot()
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.stop()
            raise AssertionError(f"timed out after {timeout} s; log:\n{self.text()[-3000:]}")
        return self.proc.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self._snapshot()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self._seen.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self._out.close()


def wait_for(path: Path, text: str, procs: list[Launched], timeout: float) -> None:
    """Until `text` appears in the file `path`; fails early if every process has ended."""
    end = time.time() + timeout
    while time.time() < end:
        for p in procs:
            p._snapshot()
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if all(p.proc.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    logs = "\n".join(p.text()[-2000:] for p in procs)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{logs}")


def run_checked(cmd: list[str], env: dict, log: Path, timeout: float,
                cwd: Optional[Path] = None) -> str:
    """Run to completion (cleaned up on timeout); assert exit 0; return the output."""
    p = Launched(cmd, env, log, cwd or ROOT)
    try:
        rc = p.wait(timeout)
    finally:
        p.stop()
    out = p.text()
    assert rc == 0, f"{cmd[:3]} exited {rc}:\n{out[-4000:]}"
    return out
