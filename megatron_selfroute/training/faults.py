"""Run faults: a non-finite loss on any rank (skip or stop), the fault-injection hook of tests,
and the SIGTERM latch of --exit-signal-handler."""
from __future__ import annotations

import os
import signal
from typing import Callable, Optional

import torch

from megatron_selfroute.training.logging import print_rank0


class TrainingError(RuntimeError):
    """A run-stopping condition with a one-line reason (e.g. a NaN loss)."""


LOADER_DIED = ("a data loader worker died: killed, out of memory, or a bus error reading the "
               "data; resume with --load")


def skip_or_stop(state, tr, iteration: int, what: str, last_checkpoint: Optional[str]) -> bool:
    """Count a skipped step under --skip-nan-steps, else stop naming the last good checkpoint."""
    if state.skipped_steps < tr.skip_nan_steps:
        state.skipped_steps += 1
        print_rank0(f"> non-finite {what} at iteration {iteration}: step skipped "
                    f"({state.skipped_steps}/{tr.skip_nan_steps} allowed by --skip-nan-steps)")
        return True
    raise TrainingError(f"non-finite {what} at iteration {iteration}; last good checkpoint: "
                        f"{last_checkpoint or 'none'} (--skip-nan-steps N skips such steps)")


FaultHook = Callable[[torch.Tensor, int], torch.Tensor]
"""(loss, iteration) -> the loss to use (a test may make it non-finite)."""


def nan_injection_from_env(rank: int) -> FaultHook:
    """The run's fault hook, read once at set-up: MEGATRON_SELFROUTE_NAN_AT="3,7" makes those
    iterations' losses NaN on every rank, "3@R" only on rank R; unset = the identity."""
    spec = os.environ.get("MEGATRON_SELFROUTE_NAN_AT", "")
    at = set()
    for item in filter(None, spec.split(",")):
        it, _, on = item.partition("@")
        if not on or int(on) == rank:
            at.add(int(it))

    def hook(loss: torch.Tensor, iteration: int) -> torch.Tensor:
        return loss * float("nan") if iteration in at else loss

    return hook


def kill_injection_from_env(rank: int) -> Optional[int]:
    """MEGATRON_SELFROUTE_KILL_AT="5@1": rank 1 SIGKILLs itself at the start of iteration 5
    ("5": every rank), only in a launcher's first attempt (TORCHELASTIC_RESTART_COUNT unset or
    0), so a torchrun --max-restarts test sees one death and then a clean restart."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    for item in filter(None, os.environ.get("MEGATRON_SELFROUTE_KILL_AT", "").split(",")):
        it, _, on = item.partition("@")
        if not on or int(on) == rank:
            return int(it)
    return None


def die_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class ExitSignal:
    """The run's SIGTERM latch (--exit-signal-handler): set by the signal, read at step ends by
    every rank (all-reduced), the previous handler restored by `close`."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm) if enabled else None
        self._enabled = enabled

    def _on_sigterm(self, signum, frame) -> None:
        self.received = True

    def close(self) -> None:
        if self._enabled:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._enabled = False
