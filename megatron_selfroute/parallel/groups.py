"""Small collectives of the training loop and the clean shutdown of a run.

The process groups themselves are made by `parallel/layout.py` (`ParallelLayout.build_groups`);
this module moves the loop's small tensors (NaN flags, losses, routing counts) to the device the
backend needs and forgets every group, ours and DeepSpeed's, at the end of a run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    """Where a tensor given to a collective of this project must live: NCCL takes only tensors
    on the rank's GPU, gloo those on the CPU. Every small all-reduce in the training loop (NaN
    flags, losses, routing counts, exit flags) puts its tensor here."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_small(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """All-reduce a small tensor on the backend's device; returns it (reduced) on `t`'s device."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    buf = t.to(comm_device(), copy=True)
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def shutdown() -> None:
    """Barrier and destroy the process group (clean exit of every rank); DeepSpeed's cached
    groups are forgotten too, so a later init in the same process starts afresh."""
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                 "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
                 "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    groups.mpu = None
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)
