"""A failed checkpoint save on any rank (an injected ENOSPC at the file-write level on rank 1,
and a real full tmpfs where the test may mount one), --keep-last, and the one-writer lease on
--save, all in one 2-process group (`save_cases.py`)."""
import subprocess

import pytest

from tests.distributed.harness import spawn


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("save_faults")
    tmpfs = work / "tmpfs"
    tmpfs.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(tmpfs)],
                           capture_output=True, text=True)
    cases = ["enospc_stops", "enospc_continues", "lease"]
    if mount.returncode == 0:
        cases.append("full_disk")
    try:
        res = spawn(2, "tests.fault.save_cases", cases, work / "logs", timeout=500,
                    env={"MSR_SAVE_WORK": str(work), "MSR_TMPFS": str(tmpfs)})
    finally:
        if mount.returncode == 0:
            subprocess.run(["umount", str(tmpfs)], check=False)
    res["_mount"] = mount.stderr.strip() or "mounted"
    return res


def _both(results, case):
    per_rank = results[case]
    assert len(per_rank) == 2 and not any("error" in r for r in per_rank), per_rank
    return per_rank


def test_enospc_on_rank1_stops_and_keeps_previous(results):
    r0, r1 = _both(results, "enospc_stops")
    for r in (r0, r1):  # every rank stops with the same one-line reason
        assert r["err"].startswith("CheckpointSaveError: checkpoint iter_0000004 was not "
                                     "saved: writing failed on rank 1"), r["err"]
        assert "No space left on device" in r["err"] and "\n" not in r["err"]
        assert "still names iter_0000002 (intact)" in r["err"]
    assert r0["pointer"] == "iter_0000002" and r0["problems"] == [] and r0["verified"]
    # the partial directory is gone, --keep-last 1 deleted nothing before a newer one existed
    assert r0["listing"] == ["iter_0000002", "latest_checkpointed_iteration.txt"], r0
    assert r0["resumed_iters"] == [3]


def test_continue_on_save_failure_misses_one_save(results):
    r0, _ = _both(results, "enospc_continues")
    assert r0["err"] is None and r0["iteration"] == 6 and r0["missed"] == [4]
    assert r0["pointer"] == "iter_0000006" and r0["verified"] and r0["problems"] == []
    assert r0["listing"] == ["iter_0000006", "latest_checkpointed_iteration.txt"], r0


def test_lease_refuses_live_holder_and_takes_stale(results):
    for r in _both(results, "lease"):
        assert r["refused"].startswith("ConfigError: --save "), r["refused"]
        assert "in use by another run (host node-other-17 pid 4242, job SLURM_JOB_ID=999" in \
            r["refused"]
        assert r["untouched"] == ["save_lease.json"]  # refused before writing anything
        assert r["stale_error"] is None and r["stale_iteration"] == 1
        assert "save_lease.json" not in r["listing"] and r["verified"]


def test_real_full_disk(results):
    if "full_disk" not in results:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({results['_mount']}); the "
                    "injected-ENOSPC tests cover the same path")
    for r in _both(results, "full_disk"):
        assert r["first_error"] is None
        assert r["err"].startswith("CheckpointSaveError: checkpoint iter_0000003 was not "
                                     "saved: writing failed on rank"), r["err"]
        assert "No space left on device" in r["err"]
        assert r["pointer"] == "iter_0000002" and r["problems"] == [] and r["verified"]
        assert r["listing"] == ["iter_0000002", "latest_checkpointed_iteration.txt"], r
