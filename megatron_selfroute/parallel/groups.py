"""Process groups, created in one place and passed explicitly.

Layout (as in DeepSpeed and Megatron): W processes, expert-parallel size P. Dense parameters are
data-parallel over all W; expert-parallel groups are P consecutive ranks ([0..P-1], [P..2P-1], ...)
and each expert is replicated over the W/P ranks with the same expert-parallel rank (the
expert-data-parallel group). DeepSpeed's `groups` module owns the groups (its engine reduces expert
gradients over them); this module creates them and hands them to the MoE layers.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


def _disable_shm_comm() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on CPU (about a minute): use gloo plainly."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: Optional[str] = None, timeout_minutes: float = 10.0) -> None:
    """Initialise torch.distributed through DeepSpeed from launcher env vars (idempotent).

    Works with torchrun, the deepspeed launcher and SLURM-style env (RANK, WORLD_SIZE, MASTER_*);
    a bare `python script.py` runs as a 1-process group on a free local port.
    """
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _disable_shm_comm()
    elif backend == "nccl" and torch.cuda.is_available():
        # Bind this rank to its GPU before the first collective (as Megatron does): NCCL groups and
        # barriers otherwise guess device 0 on every rank of a node.
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        torch.cuda.set_device(int(local) % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    _default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


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


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Give every later `new_group` (DeepSpeed's expert and data groups) the same timeout as the
    world group; torch would otherwise use its 30-minute default and a stalled rank could hang
    its peers that long."""
    if getattr(dist.new_group, "_msr_timeout", None) == timeout:
        return
    plain = getattr(dist.new_group, "_msr_plain", dist.new_group)

    def new_group(*args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        return plain(*args, **kwargs)

    new_group._msr_timeout, new_group._msr_plain = timeout, plain
    dist.new_group = new_group


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_parallel_group(ep_size: int):
    """DeepSpeed's expert-parallel group of size `ep_size` for this rank (created on first use)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(ep_size: int):
    """Ranks holding replicas of this rank's experts."""
    from deepspeed.utils import groups

    expert_parallel_group(ep_size)
    return groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")


def setup_moe_groups(model: torch.nn.Module, ep_size: int) -> None:
    """Give every MoE layer its expert-parallel group (the engine does the same on initialize)."""
    from megatron_selfroute.moe.layer import MoELayer

    group = expert_parallel_group(ep_size) if ep_size > 1 else None
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.set_expert_parallel_group(group)


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
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)
