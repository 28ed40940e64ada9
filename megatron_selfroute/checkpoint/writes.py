"""Checkpoint file writes that report failure instead of raising mid-save, and the injected
full disk of the fault tests.

Every file of a save (DeepSpeed's, through `SafeCheckpointEngine.save`, and this project's RNG
and run-state files) is written with `write_file`: opened, written, flushed and fsynced; an
`OSError` (ENOSPC, EIO, EDQUOT, ...) removes the partial file and is returned as one line, so
the rank keeps taking part in DeepSpeed's collectives and the save's all-ranks verdict
(`training/checkpointing.py`) decides what happens.

Fault injection (tests): MEGATRON_SELFROUTE_ENOSPC_AT="4@1" makes rank 1's writes of the save at
iteration 4 fail with ENOSPC after their first 4 KiB, at the file-write level ("4" alone: every
rank).
"""
from __future__ import annotations

import errno
import io
import os
from typing import Callable, Optional

ENV = "MEGATRON_SELFROUTE_ENOSPC_AT"
FAULT_AFTER_BYTES = 4096


class DiskFault:
    """A disk that fills after `after_bytes` bytes of this save (cumulative over its files)."""

    def __init__(self, after_bytes: int = FAULT_AFTER_BYTES) -> None:
        self.left = after_bytes


def disk_fault_from_env(iteration: int, rank: int) -> Optional[DiskFault]:
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        it, _, on = item.partition("@")
        if int(it) == iteration and (not on or int(on) == rank):
            return DiskFault()
    return None


class _GuardedFile:
    """A binary file that remembers the OSError of a failed write (torch's zip writer turns it
    into a RuntimeError about stream positions) and, under a fault, fails with ENOSPC once the
    fault's budget is spent."""

    def __init__(self, f, fault: Optional[DiskFault], path: str) -> None:
        self._f, self._fault, self._path = f, fault, path
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            if self._fault is not None:
                n = len(memoryview(data).cast("B"))
                if n > self._fault.left:
                    self._f.write(memoryview(data).cast("B")[: self._fault.left])
                    self._fault.left = 0
                    raise OSError(errno.ENOSPC, "No space left on device (injected by "
                                  f"{ENV})", self._path)
                self._fault.left -= n
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def fileno(self) -> int:
        # Without a file descriptor torch writes tensor storages through `write` too (legacy
        # format), so every byte passes here.
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)


def describe(e: OSError, path: str) -> str:
    reason = e.strerror or str(e)
    return f"writing {e.filename or path}: [Errno {e.errno}] {reason}"


def write_file(path: str, fill: Callable[[object], None],
               fault: Optional[DiskFault] = None) -> Optional[str]:
    """Write `path` with `fill(file)`, flush and fsync; None on success, else one line (the
    partial file removed)."""
    guarded = None
    try:
        with open(path, "wb") as f:
            guarded = _GuardedFile(f, fault, path)
            fill(guarded)
            f.flush()
            os.fsync(f.fileno())
        return None
    except Exception as exc:  # noqa: BLE001 - torch's writer wraps the OSError
        try:
            os.unlink(path)
        except OSError:
            pass
        e = guarded.error if guarded is not None and guarded.error is not None else exc
        if not isinstance(e, OSError):
            raise
        return describe(e, path)  # open, write, flush, fsync or close failed


def torch_save(obj, path: str, fault: Optional[DiskFault] = None,
               zipfile: bool = True) -> Optional[str]:
    import torch

    return write_file(path, lambda f: torch.save(obj, f, _use_new_zipfile_serialization=zipfile),
                      fault)


def json_save(obj, path: str, fault: Optional[DiskFault] = None) -> Optional[str]:
    import json

    data = json.dumps(obj, indent=1).encode()
    return write_file(path, lambda f: f.write(data), fault)
