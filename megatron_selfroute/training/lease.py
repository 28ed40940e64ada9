"""One writer per `--save` directory: a lease file with a heartbeat, without `flock`.

Two jobs writing one checkpoint directory (a requeued SLURM job overlapping its predecessor, a
copy-pasted launch) would interleave `iter_*` directories and race on the pointer file. Rank 0
of a run therefore holds a lease on `--save` for the whole run:

    DIR/save_lease.json   {"host", "pid", "pid_start", "job_id", "started", "heartbeat", "token"}

* **Taking it.** The lease is written to a private temporary file and published with `os.link`,
  which fails when the lease exists (atomic on POSIX filesystems, NFS and Lustre alike; `flock`
  is not relied on: it is advisory-only or unsupported on many shared filesystems).
* **An existing lease** may be taken over (replaced with `os.replace`) only by a later start of
  the holder's job (the same `SLURM_JOB_ID` with a higher `SLURM_RESTART_COUNT`: a requeue; or the
  same torchrun run id with a higher `TORCHELASTIC_RESTART_COUNT`), when its holder is a dead
  process on this host (its pid is gone or belongs to a newer process), or when it is stale: its
  heartbeat is older than `--save-lease-timeout` seconds (the holder's host is down or cut off).
  Any other holder, two steps of one allocation included, makes the run refuse with one line
  naming it, before any training.
* **Heartbeat.** A daemon thread rewrites the heartbeat every timeout/6 seconds. When it finds
  the lease replaced by another run (this one was stopped long enough to look stale), the lease
  is *lost*: the next checkpoint save refuses, so the old run can never overwrite the new one.
* **Release.** The run removes the lease at its end (also after an error); a killed run leaves
  it behind, to be taken over as above.

Clocks of the hosts sharing a filesystem must agree to well within the timeout (NTP).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_selfroute.config import ConfigError

LEASE = "save_lease.json"
JOB_ID_VARS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "PBS_JOBID", "LSB_JOBID")


class LeaseError(ConfigError):
    """The `--save` directory is held by another live run."""


def job_id() -> str:
    """This job's scheduler id (SLURM, torchrun's rendezvous id, PBS, LSF) or '' when none."""
    for var in JOB_ID_VARS:
        value = os.environ.get(var, "")
        if value and value != "none":  # torchrun's default run id is the literal "none"
            return f"{var}={value}"
    return ""


ATTEMPT_VARS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


def attempt() -> int:
    """Which start of this job this is: SLURM's requeue count or torchrun's restart count."""
    for var in ATTEMPT_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def process_start(pid: int) -> Optional[str]:
    """The start time of `pid` in clock ticks since boot (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: Optional[str]) -> bool:
    """Whether `pid` is running on this host and is the same process that took the lease."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = process_start(pid)
    return start is None or now is None or now == start


@dataclass
class Holder:
    host: str
    pid: int
    job_id: str
    started: float
    heartbeat: float
    token: str
    pid_start: Optional[str] = None
    attempt: int = 0

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), job_id(), now, now, uuid.uuid4().hex,
                   process_start(os.getpid()), attempt())

    def describe(self, now: float) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"host {self.host} pid {self.pid}{job}, started {started}, last heartbeat "
                f"{max(now - self.heartbeat, 0):.0f} s ago")


def read_holder(path: str) -> Optional[Holder]:
    """The lease's holder; None when the file is missing or unreadable (a torn foreign file)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return None


def _write_tmp(save_dir: str, holder: Holder) -> str:
    tmp = os.path.join(save_dir, f".{LEASE}.{holder.token}.{time.time_ns()}")
    with open(tmp, "w") as f:
        json.dump(asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def takeover_reason(holder: Optional[Holder], me: Holder, timeout_s: float,
                    mtime: float) -> Optional[str]:
    """Why `me` may replace `holder`'s lease, or None when the holder must be respected."""
    now = time.time()
    if holder is None:  # unreadable: respect it until it is as old as a stale heartbeat
        return "unreadable lease file" if now - mtime > timeout_s else None
    if holder.job_id and holder.job_id == me.job_id and me.attempt > holder.attempt:
        # a requeue or restart of the holder's job (two steps of one allocation, or two
        # launches sharing a rendezvous id, are the same attempt: they are refused)
        return f"a later start of the same job ({me.job_id}, attempt {me.attempt})"
    if holder.host == me.host and holder.pid == me.pid:
        return "this process"
    if holder.host == me.host and not pid_alive(holder.pid, holder.pid_start):
        return f"its process {holder.pid} on this host is gone"
    if now - holder.heartbeat > timeout_s:
        return f"no heartbeat for {now - holder.heartbeat:.0f} s (> {timeout_s:g} s)"
    return None


class SaveLease:
    """Rank 0's lease on a `--save` directory (see the module docstring)."""

    def __init__(self, save_dir: str, timeout_s: float) -> None:
        self.save_dir, self.timeout_s = save_dir, float(timeout_s)
        self.path = os.path.join(save_dir, LEASE)
        self.me = Holder.me()
        self.took_over: Optional[str] = None
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- taking, keeping, releasing ----------------------------------------------------------

    def acquire(self) -> "SaveLease":
        """Take the lease or raise LeaseError naming the live holder."""
        os.makedirs(self.save_dir, exist_ok=True)
        for _ in range(5):
            tmp = _write_tmp(self.save_dir, self.me)
            try:
                try:
                    os.link(tmp, self.path)
                    return self._start()
                except FileExistsError:
                    pass
                try:
                    mtime = os.stat(self.path).st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                holder = read_holder(self.path)
                reason = takeover_reason(holder, self.me, self.timeout_s, mtime)
                if reason is None and holder is None:
                    time.sleep(0.1)  # being replaced or released right now: look again
                    continue
                if reason is None:
                    held = holder.describe(time.time())
                    raise LeaseError(
                        f"--save {self.save_dir} is in use by another run ({held}); "
                        f"stop it, use another --save, or wait until its lease is stale "
                        f"(--save-lease-timeout {self.timeout_s:g} s); lease file {self.path}")
                os.replace(tmp, self.path)
                tmp = None
                # Two runs taking over at once: both replace, the later wins. Re-read after a
                # moment; the loser sees the winner's token and goes round again (and refuses).
                time.sleep(0.05)
                if self._mine():
                    self.took_over = reason
                    return self._start()
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
        raise LeaseError(f"--save {self.save_dir}: could not take the lease {self.path} "
                         "(another run keeps replacing it)")

    def _mine(self) -> bool:
        holder = read_holder(self.path)
        return holder is not None and holder.token == self.me.token

    def _start(self) -> "SaveLease":
        interval = max(self.timeout_s / 6, 0.05)
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                        name="save-lease-heartbeat")
        self._thread.start()
        return self

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the heartbeat; mark the lease lost when another run holds it now."""
        if self.lost:
            return
        holder = read_holder(self.path)
        if holder is None or holder.token != self.me.token:
            self.lost = (holder.describe(time.time()) if holder is not None
                         else f"{self.path} was removed")
            return
        self.me.heartbeat = time.time()
        try:
            os.replace(_write_tmp(self.save_dir, self.me), self.path)
        except OSError:
            pass  # a full disk or a flaky mount: the next beat tries again

    def check(self) -> Optional[str]:
        """None while the lease is ours; otherwise a one-line reason (for the save to refuse)."""
        if self.lost is None and not self._mine():
            self.refresh()
        if self.lost:
            return (f"the lease on --save {self.save_dir} was taken by another run "
                    f"({self.lost}); this run stops without writing")
        return None

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._mine():
            try:
                os.unlink(self.path)
            except OSError:
                pass
