"""Entry-point wrapper of the training scripts: one-line errors, exit codes, clean shutdown."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable

import torch.distributed as dist

from megatron_selfroute.checkpoint import CheckpointError
from megatron_selfroute.cli import first_line
from megatron_selfroute.config import ConfigError
from megatron_selfroute.parallel.groups import shutdown
from megatron_selfroute.training.faults import LOADER_DIED, TrainingError


def _is_comm_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        k in text for k in ("gloo", "nccl", "timed out", "connection closed", "connection reset",
                            "broken pipe"))


def _one_line(e: BaseException) -> str:
    """The message of an error, without the worker traceback a DataLoader re-raise embeds
    ("Caught DataReadError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name = type(e).__name__ + ": "
        return last[len(name):] if last.startswith(name) else last
    return text


def _loader_worker_died(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker")


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Entry-point wrapper: one-line errors (no traceback unless --debug), clean shutdown.

    A failed collective (a peer rank died, or stalled past --distributed-timeout-minutes) ends
    this rank at once with exit code 3, so no rank hangs on a dead job.
    """
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        main(argv)
        shutdown()
    except (ConfigError, CheckpointError, TrainingError, ValueError, FileNotFoundError) as e:
        if debug:
            raise
        rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        print(f"error: {rank}{_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except Exception as e:
        if _loader_worker_died(e) and not debug:
            rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
            first = str(e).strip().splitlines()[0]
            print(f"error: {rank}{first} ({LOADER_DIED})", file=sys.stderr, flush=True)
            os._exit(1)  # the dead worker's siblings and queues must not hold the exit
        if not _is_comm_failure(e):
            raise
        if debug:
            traceback.print_exc()
        rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        first = first_line(e)
        print(f"error: {rank}collective communication failed: {first} (a peer rank died or "
              "stalled past --distributed-timeout-minutes)", file=sys.stderr, flush=True)
        os._exit(3)
