"""The parallel layout: every degree, its validation, the process groups and DeepSpeed's `mpu`.

One `ParallelLayout` is made per run from the config and the world size (`from_config`), before
any heavy work, and passed explicitly to everything that needs a degree, a rank or a group. This
module is the only code that reads or sets the launcher's environment (`RANK`, `WORLD_SIZE`, ...):
`init_distributed`, `launcher_env` for tools and tests that start ranks, and
`private_process_group` for tools that need DeepSpeed outside a launch.

Degrees (W processes): tensor parallel TP, data parallel DP = W / TP, expert parallel EP (carved
out of data parallelism, as in DeepSpeed and Megatron-DeepSpeed), expert-data parallel
EDP = DP / EP. Rank order, Megatron core's default tp-cp-ep-dp-pp without cp and pp:

    rank = dp_rank * TP + tp_rank                 tensor-parallel ranks are adjacent (one node)
    tensor-parallel group   [d*TP + t for t < TP]            (fixed d)
    data-parallel group     [d*TP + t for d < DP]            (fixed t)
    expert-parallel group   EP consecutive members of a data-parallel group
    expert-data group       every rank with the same expert-parallel rank: its EDP data-parallel
                            replicas and, with TP > 1, their T tensor-parallel peers (experts
                            are whole on each rank and each TP rank routes 1/T of the tokens,
                            so one reduction over these T x EDP ranks sums both; Megatron core's
                            MoE "parallel folding" with expert-TP 1 groups them the same way)

With TP = 1: expert-parallel groups are EP consecutive ranks ([0..EP-1], [EP..2EP-1], ...) and
each expert is replicated over the DP / EP ranks that share an expert-parallel rank. This is the
order of DeepSpeed's `groups._get_expert_parallel_ranks`, so its engine, given this object as
`mpu`, reduces dense gradients over the data-parallel group and expert gradients over the
expert-data group that this object created and registered under DeepSpeed's name
`ep_size_<EP>`.

The `mpu` contract (what DeepSpeed 0.19.8 calls): `get_{model,tensor_model,data}_parallel_
{rank,world_size,group}`, `get_data_parallel_group_ranks`, `get_tensor_model_parallel_src_rank`
and `get_pipeline_model_parallel_{world_size,rank}`. The `get_sequence_parallel_*` methods are
deliberately absent: DeepSpeed reads them as Ulysses sequence parallelism.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_selfroute.config import Config, ConfigError


def launch_world_size() -> Optional[int]:
    """The process count the launcher (torchrun, deepspeed, srun) announced, or None."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def launch_rank() -> int:
    """This process's global rank as the launcher announced it (0 for a bare `python`)."""
    return int(os.environ.get("RANK", "0"))


def launcher_env(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict:
    """The variables torchrun sets for one rank (for tools and tests that start ranks)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disable_shm_comm() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on CPU (about a minute): use gloo plainly."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Give every later `new_group` (this layout's and DeepSpeed's) the same timeout as the world
    group; torch would otherwise use its 30-minute default and a stalled rank could hang its
    peers that long."""
    if getattr(dist.new_group, "_msr_timeout", None) == timeout:
        return
    plain = getattr(dist.new_group, "_msr_plain", dist.new_group)

    def new_group(*args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        return plain(*args, **kwargs)

    new_group._msr_timeout, new_group._msr_plain = timeout, plain
    dist.new_group = new_group


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
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
        # torchrun --max-restarts (torch 2.14): restarted workers share the agent's store with
        # the dead attempt, whose process-group keys (every rank's address) are still there, so
        # gloo/NCCL connect to dead peers. Give this attempt its own key prefix.
        store = dist.PrefixStore(f"megatron_selfroute/restart_{restart}/", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
            int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout))
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def check_tensor_degree(cfg: Config, tp: int) -> None:
    """What --tensor-model-parallel-size T needs of the model: heads, FFN sizes and the padded
    vocabulary divisible by T (the vocabulary is not re-padded per T, so a checkpoint's tensors
    keep one shape across layouts), and, with MoE, each micro-batch's tokens split T ways."""
    if tp < 1:
        raise ConfigError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if tp == 1:
        return
    m, moe, flag = cfg.model, cfg.moe, f"--tensor-model-parallel-size {tp}"
    if m.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"{flag}")
    if m.ffn_size % tp:
        raise ConfigError(f"the FFN size {m.ffn_size} (--ffn-hidden-size) is not divisible by "
                          f"{flag}")
    shared = moe.moe_shared_expert_intermediate_size or 0
    if moe.is_moe and shared % tp:
        raise ConfigError(f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                          f"{flag}")
    if m.vocab_size and m.padded_vocab_size % tp:
        raise ConfigError(f"the padded vocabulary {m.padded_vocab_size} (--vocab-size / "
                          f"--make-vocab-size-divisible-by) is not divisible by {flag}")
    if cfg.train.fp16:
        raise ConfigError(f"--fp16 with {flag}: DeepSpeed's fp16 wrapper reads the model-parallel "
                          "tag off gradient tensors and misses every shard of TP rank != 0 in "
                          "its norm; use --bf16")
    if moe.is_moe:
        tokens = cfg.train.micro_batch_size * m.seq_length
        if m.vocab_size and tokens % tp:  # GPT (a ViT checks its patch count at its forward)
            raise ConfigError(f"{tokens} tokens per micro-batch (--micro-batch-size x sequence) "
                              f"do not split over {flag} (each TP rank routes 1/T of them)")
        if moe.moe_token_dispatcher_type == "deepspeed":
            raise ConfigError(f"--moe-token-dispatcher-type deepspeed with {flag}: DeepSpeed's "
                              "MOELayer splits its capacity buffers over TP itself; use alltoall")
        if moe.moe_expert_capacity_factor is not None:
            raise ConfigError(f"--moe-expert-capacity-factor with {flag}: token dropping is "
                              "decided per rank's token slice (not supported; run dropless)")


@dataclass
class _Groups:
    """Process-group handles of this rank (filled by `ParallelLayout.build_groups`)."""

    tp: Any = None
    dp: Any = None
    ep: Any = None
    edp: Any = None


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees, ranks and groups of one run (see the module docstring for the rank order)."""

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    ep: int = 1
    moe: bool = False  # expert groups are created only for MoE models
    _groups: _Groups = field(default_factory=_Groups, compare=False, repr=False)

    # ---- construction and validation ---------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Config, world_size: Optional[int] = None,
                    rank: Optional[int] = None, check: bool = True) -> "ParallelLayout":
        """The layout of `cfg` on `world_size` processes (default: the launcher's, else 1),
        validated against the config (unless `check` is False, for a script that still changes
        the batch: it calls `validate` itself); raises ConfigError naming the flags."""
        if world_size is None:
            world_size = (dist.get_world_size() if dist.is_initialized()
                          else launch_world_size() or 1)
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else launch_rank()
        layout = cls(world_size=world_size, rank=rank, tp=cfg.parallel.tensor_model_parallel_size,
                     ep=cfg.parallel.expert_model_parallel_size, moe=cfg.moe.is_moe)
        if check:
            layout.validate(cfg)
        return layout

    @classmethod
    def single(cls, cfg: Optional[Config] = None) -> "ParallelLayout":
        """One process holding everything (tools, evaluation, tests)."""
        return cls(world_size=1, rank=0, tp=1, ep=1, moe=bool(cfg and cfg.moe.is_moe))

    def validate(self, cfg: Config) -> None:
        """Every rule that ties a degree to the world size, the model or the batch."""
        w, t, e = self.world_size, self.tp, self.ep
        if w < 1 or not 0 <= self.rank < w:
            raise ConfigError(f"rank {self.rank} of {w} processes is not a valid launch")
        if t < 1 or w % t:
            raise ConfigError(f"--tensor-model-parallel-size {t} does not divide the {w} "
                              "processes")
        check_tensor_degree(cfg, t)
        if e < 1 or self.dp % e:
            raise ConfigError(f"--expert-model-parallel-size {e} does not divide the {self.dp} "
                              "data-parallel processes")
        n = cfg.moe.num_experts
        if n and n % e:
            raise ConfigError(f"--num-experts {n} is not divisible by "
                              f"--expert-model-parallel-size {e}")
        tr = cfg.train
        if tr.global_batch_size is not None:
            per_step = tr.micro_batch_size * self.dp
            if tr.global_batch_size % per_step != 0:
                raise ConfigError(
                    f"--global-batch-size {tr.global_batch_size} is not divisible by "
                    f"--micro-batch-size {tr.micro_batch_size} x {self.dp} data-parallel "
                    "processes")

    # ---- degrees and ranks (pure arithmetic) -------------------------------------------------

    @property
    def dp(self) -> int:
        """Data-parallel degree: W / TP."""
        return self.world_size // self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree (replicas of each expert): DP / EP."""
        return self.dp // self.ep

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        """Index in the expert-data group (which, with TP, also spans the tensor group)."""
        return (self.dp_rank // self.ep) * self.tp + self.tp_rank

    @property
    def expert_group_name(self) -> str:
        """DeepSpeed's name of the expert groups (`ep_size_<EP>`), also each expert's tag."""
        return f"ep_size_{self.ep}"

    def num_local_experts(self, num_experts: int) -> int:
        return num_experts // self.ep

    def local_experts(self, num_experts: int) -> range:
        """Global ids of this rank's experts: a contiguous block per expert-parallel rank."""
        n = self.num_local_experts(num_experts)
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    # ---- rank lists of every group -----------------------------------------------------------

    def tp_groups(self) -> list[list[int]]:
        return [[d * self.tp + t for t in range(self.tp)] for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[d * self.tp + t for d in range(self.dp)] for t in range(self.tp)]

    def ep_groups(self) -> list[list[int]]:
        return [g[i:i + self.ep] for g in self.dp_groups() for i in range(0, self.dp, self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """Every rank that holds expert-parallel rank j's experts: its expert-data replicas and,
        with TP, their tensor-parallel peers (each routes 1/T of the tokens, so one engine
        reduction over this group sums the T token slices and the replicas alike)."""
        if self.tp == 1:
            return [g[j::self.ep] for g in self.dp_groups() for j in range(self.ep)]
        return [[r for r in range(self.world_size) if (r // self.tp) % self.ep == j]
                for j in range(self.ep)]

    def describe(self) -> dict:
        """Degrees as a plain dict (logged and saved with checkpoints)."""
        return {"world": self.world_size, "tp": self.tp, "dp": self.dp, "ep": self.ep,
                "edp": self.edp}

    def __str__(self) -> str:
        return (f"world {self.world_size} = TP {self.tp} x DP {self.dp}; EP {self.ep} x "
                f"expert-DP {self.edp}")

    # ---- process groups ----------------------------------------------------------------------

    def build_groups(self) -> "ParallelLayout":
        """Create every process group of this layout (every rank calls it, after
        `init_distributed`) and register the expert groups with DeepSpeed's `groups` module, so
        its engine and this project's MoE layers share them. Returns self."""
        from deepspeed.utils import groups as ds_groups

        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout.build_groups needs torch.distributed initialised")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ConfigError(f"layout made for rank {self.rank} of {self.world_size}, but this "
                              f"process is rank {dist.get_rank()} of {dist.get_world_size()}")
        g = self._groups

        def make(rank_lists: list[list[int]]):
            mine = None
            for ranks in rank_lists:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = group
            return mine

        g.tp = make(self.tp_groups())
        g.dp = make(self.dp_groups())
        if self.moe:
            name = self.expert_group_name
            g.ep = make(self.ep_groups())
            g.edp = make(self.edp_groups())
            ds_groups._EXPERT_PARALLEL_GROUP[name] = g.ep
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = next(
                r for r in self.ep_groups() if self.rank in r)
            ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = g.edp
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = next(
                r for r in self.edp_groups() if self.rank in r)
        return self

    def _group(self, name: str):
        group = getattr(self._groups, name)
        if group is None and dist.is_initialized():
            raise RuntimeError(f"the {name} group does not exist: call build_groups() first"
                               + ("" if self.moe or name not in ("ep", "edp")
                                  else " (and make the layout for an MoE config)"))
        return group

    @property
    def ep_group(self):
        """This rank's expert-parallel group (None before `build_groups` on one process)."""
        return self._group("ep") if self.world_size > 1 else self._groups.ep

    @property
    def edp_group(self):
        return self._group("edp") if self.world_size > 1 else self._groups.edp

    @property
    def dp_group(self):
        return self._group("dp")

    @property
    def tp_group(self):
        return self._group("tp")

    # ---- DeepSpeed's mpu contract ------------------------------------------------------------

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 of this rank's group."""
        return self.rank - self.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return next(r for r in self.dp_groups() if self.rank in r)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


@contextmanager
def private_process_group():
    """A one-process gloo group on a free local port for tools that need DeepSpeed outside a
    launch (none is made when a group exists); the launcher variables it sets and DeepSpeed's
    group registry are restored afterwards."""
    from deepspeed.utils import groups as ds_groups

    from megatron_selfroute.parallel.groups import shutdown

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_mpu = ds_groups.mpu
    saved_groups = {name: dict(getattr(ds_groups, name)) for name in (
        "_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS")}
    owns = not dist.is_initialized()
    if owns:
        for k in keys:  # never join a job's rendezvous from here
            os.environ.pop(k, None)
        init_distributed("gloo")
    try:
        yield
    finally:
        if owns:
            shutdown()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        else:
            ds_groups.mpu = saved_mpu
            for name, value in saved_groups.items():
                getattr(ds_groups, name).clear()
                getattr(ds_groups, name).update(value)
