"""The one-writer lease on --save (training/lease.py), with real processes as holders."""
import json
import os
import subprocess
import sys
import time

import pytest

from megatron_selfroute.training.lease import LEASE, LeaseError, SaveLease

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from megatron_selfroute.training.lease import SaveLease
lease = SaveLease({d!r}, 30).acquire()
print("held", flush=True)
time.sleep(60)
"""
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _holder(d, env=None):
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, d=str(d))],
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
    assert p.stdout.readline().strip() == "held"
    return p


def _clean_env(monkeypatch):
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "PBS_JOBID", "LSB_JOBID",
                "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)


def test_live_holder_refuses_then_dead_holder_is_taken_over(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    p = _holder(tmp_path)
    try:
        with pytest.raises(LeaseError, match=rf"in use by another run \(host \S+ pid {p.pid},"):
            SaveLease(str(tmp_path), 30).acquire()
    finally:
        p.kill()
        p.wait()
    lease = SaveLease(str(tmp_path), 30).acquire()  # its process is gone: taken over
    assert lease.took_over == f"its process {p.pid} on this host is gone"
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_same_slurm_job_takes_over_a_live_holder(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    p = _holder(tmp_path, {"SLURM_JOB_ID": "777"})
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job is refused
        with pytest.raises(LeaseError, match="job SLURM_JOB_ID=777"):
            SaveLease(str(tmp_path), 30).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "777")  # a second step of the same start: refused
        with pytest.raises(LeaseError, match="job SLURM_JOB_ID=777"):
            SaveLease(str(tmp_path), 30).acquire()
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeue keeps the job id
        lease = SaveLease(str(tmp_path), 30).acquire()
        assert lease.took_over == "a later start of the same job (SLURM_JOB_ID=777, attempt 1)"
        lease.release()
    finally:
        p.kill()
        p.wait()


def _foreign(d, heartbeat_age):
    now = time.time()
    (d / LEASE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "job_id": "",
                                       "started": now - 999, "heartbeat": now - heartbeat_age,
                                       "token": "x"}))


def test_other_host_respected_until_stale(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    _foreign(tmp_path, 10)
    with pytest.raises(LeaseError, match="host elsewhere pid 1, started .* last heartbeat 10 s"):
        SaveLease(str(tmp_path), 30).acquire()
    _foreign(tmp_path, 31)
    lease = SaveLease(str(tmp_path), 30).acquire()
    assert lease.took_over.startswith("no heartbeat for 31 s")
    lease.release()


def test_heartbeat_refreshes_and_a_taken_lease_is_lost(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    lease = SaveLease(str(tmp_path), 0.6).acquire()  # beats every 0.1 s
    first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
    time.sleep(0.4)
    assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first
    assert lease.check() is None
    _foreign(tmp_path, 0)  # another run took it over (this one looked stale)
    time.sleep(0.3)
    msg = lease.check()
    assert msg and "was taken by another run (host elsewhere pid 1" in msg
    lease.release()
    assert (tmp_path / LEASE).exists()  # not ours: left alone
