"""Checkpoint-save faults and the --save lease, run inside one 2-process gloo group
(`tests/fault/test_save_faults.py`). EP=2 and ZeRO-2, so both ranks write model, expert and
optimizer files."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from megatron_selfroute.checkpoint import manifest
from megatron_selfroute.checkpoint.files import read_pointer
from megatron_selfroute.checkpoint.writes import ENV
from megatron_selfroute.training.lease import LEASE
from tests.distributed.train_cases import MOCK, TINY

BASE = TINY + MOCK + ["--router-type", "self", "--expert-model-parallel-size", "2",
                      "--zero-stage", "2", "--micro-batch-size", "2"]


def _work(name: str) -> Path:
    return Path(os.environ["MSR_SAVE_WORK"]) / name


def _train(argv: list[str]):
    import pretrain_gpt

    return pretrain_gpt.main(BASE + argv)


def _attempt(argv: list[str], enospc: str = "") -> tuple[object, str | None]:
    """(result or None, "Type: message" of the error or None)."""
    if enospc:
        os.environ[ENV] = enospc
    try:
        return _train(argv), None
    except Exception as e:  # the error every rank must raise is the thing under test
        return None, f"{type(e).__name__}: {e}"
    finally:
        os.environ.pop(ENV, None)


def _state(d: Path) -> dict:
    dist.barrier()
    pointer = read_pointer(str(d))
    return {"listing": sorted(n for n in os.listdir(d) if not n.startswith("zero_to_")),
            "pointer": pointer,
            "problems": manifest.problems(str(d / pointer)) if pointer else ["no pointer"],
            "verified": pointer is not None and manifest.read(str(d / pointer)) is not None}


def enospc_stops() -> dict:
    """Rank 1's disk fills during the save at iteration 4 (--keep-last 1): the run stops with
    one line on every rank; iter 2 stays, named by the pointer, verifiable and resumable."""
    d = _work("enospc")
    _, err = _attempt(["--save", str(d), "--save-interval", "2", "--train-iters", "6",
                       "--keep-last", "1"], enospc="4@1")
    out = {"err": err, **_state(d)}
    resumed, err2 = _attempt(["--load", str(d), "--train-iters", "3"])
    out["resumed_iters"] = sorted(resumed.losses) if resumed else err2
    return out


def enospc_continues() -> dict:
    """The same fault under --continue-on-save-failure: training goes on, the save at 4 is
    missed and counted, the one at 6 completes; --keep-last 1 then deletes iter 2."""
    d = _work("enospc_continue")
    res, err = _attempt(["--save", str(d), "--save-interval", "2", "--train-iters", "6",
                         "--keep-last", "1", "--continue-on-save-failure"], enospc="4@1")
    return {"err": err, "missed": res.missed_saves if res else None,
            "iteration": res.iteration if res else None, **_state(d)}


def lease() -> dict:
    """A live foreign holder (fresh heartbeat, another host) makes the run refuse on every rank
    before training; a stale one is taken over, and the lease is gone after the run."""
    d = _work("lease")
    if dist.get_rank() == 0:
        d.mkdir(parents=True)
        now = time.time()
        (d / LEASE).write_text(json.dumps({
            "host": "node-other-17", "pid": 4242, "job_id": "SLURM_JOB_ID=999",
            "started": now - 60, "heartbeat": now, "token": "foreign"}))
    dist.barrier()
    _, refused = _attempt(["--save", str(d), "--train-iters", "1"])
    untouched = sorted(os.listdir(d))
    dist.barrier()
    if dist.get_rank() == 0:
        holder = json.loads((d / LEASE).read_text())
        holder["heartbeat"] = time.time() - 3600
        (d / LEASE).write_text(json.dumps(holder))
    dist.barrier()
    res, err = _attempt(["--save", str(d), "--train-iters", "1", "--save-lease-timeout", "600"])
    return {"refused": refused, "untouched": untouched, "stale_error": err,
            "stale_iteration": res.iteration if res else None, **_state(d)}


def full_disk() -> dict:
    """A real size-limited tmpfs (mounted by the test): a checkpoint at iteration 2 fits; then
    the filesystem is filled to 64 KiB free and the save at 3 meets a real ENOSPC."""
    d = Path(os.environ["MSR_TMPFS"]) / "ckpt"
    _, err1 = _attempt(["--save", str(d), "--train-iters", "2"])
    dist.barrier()
    if dist.get_rank() == 0:
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        with open(Path(os.environ["MSR_TMPFS"]) / "filler", "wb") as f:
            f.write(b"\0" * max(free - (64 << 10), 0))
    dist.barrier()
    _, err = _attempt(["--load", str(d), "--save", str(d), "--train-iters", "4",
                       "--save-interval", "1"])
    return {"first_error": err1, "err": err, "host": socket.gethostname(), **_state(d)}


CASES = {"enospc_stops": enospc_stops, "enospc_continues": enospc_continues, "lease": lease,
         "full_disk": full_disk}
