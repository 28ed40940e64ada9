"""Numerical faults: detect a non-finite loss on any rank, skip or stop, and test injection."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_selfroute.parallel.groups import all_reduce_small
from megatron_selfroute.training.logging import print_rank0


class TrainingError(RuntimeError):
    """A run-stopping condition with a one-line reason (e.g. a NaN loss)."""


def any_rank_nonfinite(loss: torch.Tensor) -> bool:
    """True when the loss is NaN/Inf on any rank (every rank gets the same answer)."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    return all_reduce_small(bad, op=dist.ReduceOp.MAX).item() > 0


def skip_or_stop(state, tr, iteration: int, what: str, last_checkpoint: Optional[str]) -> bool:
    """Count a skipped step under --skip-nan-steps, else stop naming the last good checkpoint."""
    if state.skipped_steps < tr.skip_nan_steps:
        state.skipped_steps += 1
        print_rank0(f"> non-finite {what} at iteration {iteration}: step skipped "
                    f"({state.skipped_steps}/{tr.skip_nan_steps} allowed by --skip-nan-steps)")
        return True
    raise TrainingError(f"non-finite {what} at iteration {iteration}; last good checkpoint: "
                        f"{last_checkpoint or 'none'} (--skip-nan-steps N skips such steps)")


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A finite zero loss touching every trainable parameter (all-zero gradients)."""
    return sum((p.reshape(-1)[:1] * 0.0).sum() for p in model.parameters() if p.requires_grad)


def injected_fault(loss: torch.Tensor, iteration: int) -> torch.Tensor:
    """Fault injection for tests: MEGATRON_SELFROUTE_NAN_AT="3,7" makes those iterations' losses
    NaN (on every rank, or only on rank R with "3@R")."""
    spec = os.environ.get("MEGATRON_SELFROUTE_NAN_AT")
    if not spec:
        return loss
    for item in spec.split(","):
        it, _, rank = item.partition("@")
        if int(it) == iteration and (not rank or int(rank) == dist.get_rank()):
            return loss * float("nan")
    return loss
