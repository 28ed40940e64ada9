"""DeepSpeed engine set-up: the JSON config from flags (merged with a user file), the optimizer
(a torch AdamW over DeepSpeed's MoE parameter groups; no weight decay on biases and norms), the
layout as DeepSpeed's mpu, and a checkpoint engine that loads through `checkpoint/safe_load.py`.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_selfroute.checkpoint.safe_load import SafeCheckpointEngine
from megatron_selfroute.config import Config, ConfigError
from megatron_selfroute.parallel.groups import all_reduce_small
from megatron_selfroute.parallel.layout import ParallelLayout
from megatron_selfroute.parallel.tensor_parallel import is_tp_sharded

# DeepSpeed JSON key path -> (config section, field, flag)
_DS_KEYS = {
    ("train_micro_batch_size_per_gpu",): ("train", "micro_batch_size", "--micro-batch-size"),
    ("train_batch_size",): ("train", "global_batch_size", "--global-batch-size"),
    ("gradient_clipping",): ("train", "clip_grad", "--clip-grad"),
    ("zero_optimization", "stage"): ("parallel", "zero_stage", "--zero-stage"),
    ("bf16", "enabled"): ("train", "bf16", "--bf16"),
    ("fp16", "enabled"): ("train", "fp16", "--fp16"),
    ("optimizer", "params", "lr"): ("train", "lr", "--lr"),
    ("optimizer", "params", "weight_decay"): ("train", "weight_decay", "--weight-decay"),
    ("optimizer", "params", "eps"): ("train", "adam_eps", "--adam-eps"),
}


def merge_deepspeed_json(cfg: Config, path: str, explicit: set[str]) -> dict:
    """Read a DeepSpeed JSON; adopt its values for flags left at default, reject conflicts.

    Returns the JSON minus the keys this project sets itself (optimizer, batch, precision...), to
    be merged under the generated config. `explicit` holds "section.field" of flags given.
    """
    try:
        with open(path) as f:
            user = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed-config {path}: invalid JSON at line {e.lineno}: {e.msg}"
                          ) from None
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed-config {path}: top level must be an object")
    if "scheduler" in user:
        raise ConfigError(f"--deepspeed-config {path}: 'scheduler' is not supported; use "
                          "--lr-decay-style/--lr-warmup-iters")
    opt = user.get("optimizer")
    if opt is not None and str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(f"--deepspeed-config {path}: optimizer type {opt.get('type')!r} is not "
                          "supported (AdamW is built from the flags)")
    betas = (opt or {}).get("params", {}).get("betas")
    adopted = dict(_walk(user))
    if betas is not None:
        adopted[("optimizer", "params", "beta1")] = betas[0]
        adopted[("optimizer", "params", "beta2")] = betas[1]
    keymap = dict(_DS_KEYS)
    keymap[("optimizer", "params", "beta1")] = ("train", "adam_beta1", "--adam-beta1")
    keymap[("optimizer", "params", "beta2")] = ("train", "adam_beta2", "--adam-beta2")
    for key, (sec, name, flag) in keymap.items():
        if key not in adopted:
            continue
        value = adopted[key]
        current = getattr(getattr(cfg, sec), name)
        if f"{sec}.{name}" in explicit and current != value:
            raise ConfigError(f"--deepspeed-config {path}: {'.'.join(key)} = {value} conflicts "
                              f"with {flag} {current}")
        setattr(getattr(cfg, sec), name, type(current)(value) if current is not None else value)
    rest = {k: v for k, v in user.items() if k not in ("optimizer", "train_batch_size",
                                                     "train_micro_batch_size_per_gpu",
                                                     "gradient_accumulation_steps",
                                                     "gradient_clipping", "bf16", "fp16")}
    return rest


def _walk(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def deepspeed_config(cfg: Config, layout: ParallelLayout, extra: Optional[dict] = None) -> dict:
    """The engine config generated from the flags (plus pass-through keys of a user JSON)."""
    tr = cfg.train
    accum = gradient_accumulation_steps(cfg, layout.dp)
    zero = dict((extra or {}).get("zero_optimization", {}))
    zero["stage"] = cfg.parallel.zero_stage
    ds: dict[str, Any] = dict(extra or {})
    ds.update({
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": tr.micro_batch_size * accum * layout.dp,
        # ZeRO-0 fp32 clipping is done exactly by clip_gradients_stage0 (DeepSpeed's averages
        # per-rank norms, which differ across expert-parallel ranks).
        "gradient_clipping": 0.0 if _own_clipping(cfg) else tr.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": tr.bf16},
        "fp16": {"enabled": tr.fp16, "initial_scale_power": 16} if tr.fp16 else {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    })
    # DeepSpeed's throughput timer synchronises the device at every forward and every step (its
    # default); the trainer's own step timer reports throughput (two waits a step on CUDA).
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds


def _own_clipping(cfg: Config) -> bool:
    """ZeRO-0 clips with `clip_gradients_stage0`, fp32 and bf16 alike. DeepSpeed's bf16 wrapper
    at ZeRO-0 (`FP16_UnfusedOptimizer`) leaves expert gradients out of its norm and, under tensor
    parallelism, reads the model-parallel tag off the gradient tensors (which have none), so it
    counted only TP rank 0's shards. fp16 keeps DeepSpeed's (its loss scaler unscales first)."""
    return cfg.parallel.zero_stage == 0 and not cfg.train.fp16


@dataclass(frozen=True)
class GradNormGroups:
    """A model's parameters by how their gradients enter the global norm, classified once (the
    step only checks which have a gradient): replicated over the tensor group (counted once),
    tensor-parallel shards (summed over the tensor group) and experts (summed over the
    expert-parallel group), each in `model.parameters()` order."""

    replicated: tuple
    sharded: tuple
    experts: tuple

    @classmethod
    def of(cls, model: torch.nn.Module) -> "GradNormGroups":
        from deepspeed.moe.utils import is_moe_param

        groups: tuple[list, list, list] = ([], [], [])
        for p in model.parameters():
            groups[2 if is_moe_param(p) else 1 if is_tp_sharded(p) else 0].append(p)
        return cls(*(tuple(g) for g in groups))


def clip_gradients_stage0(model: torch.nn.Module, max_norm: float, layout: ParallelLayout,
                          groups: Optional[GradNormGroups] = None, fp64: bool = False) -> float:
    """Exact global gradient norm (dense once, experts summed over the expert-parallel group)
    and in-place clipping, for ZeRO stage 0 after gradients were all-reduced. `groups` (the
    engine's `grad_norm_groups`) saves classifying the parameters at every step.

    Each tensor's norm accumulates in fp32 (bf16 gradients too), as Megatron's and DeepSpeed's
    do, and the squares are summed in float64; `fp64` (--grad-norm-fp64) accumulates each norm
    in float64 instead, this project's norm before 2026-12-02 (bit-exact with its runs).

    DeepSpeed's stage-0 clipping averages per-rank norms, which differ across expert-parallel
    ranks (each holds other experts), so its clip factor is not the global one. ZeRO-1/2 sum
    squared partition norms over all data-parallel ranks, which is exact, and are left alone.
    """
    groups = groups or GradNormGroups.of(model)
    replicated, sharded, experts = ([p.grad for p in g if p.grad is not None]
                                    for g in (groups.replicated, groups.sharded, groups.experts))
    grads = replicated + sharded + experts
    device = grads[0].device if grads else "cpu"
    # Per-tensor norms with the multi-tensor kernel (float64 accumulation made the kernel 7x
    # slower on CPU, 1.6 ms more of a 40 ms step at bench_train's small shape), squared and
    # summed in float64; the sums stay on the gradients' device: one host read (the norm) a step.
    acc_dtype = torch.float64 if fp64 else torch.float32

    def sq_sum(grads):
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=acc_dtype)).double()
        return norms.square().sum()

    with torch.no_grad():
        dense = sq_sum(replicated)  # replicated over TP: counted once
        if sharded:  # a shard's square on every TP rank
            dense = dense + all_reduce_small(sq_sum(sharded), group=layout.tp_group)
        if experts:  # each expert once: summed over the expert-parallel group
            dense = dense + all_reduce_small(sq_sum(experts), group=layout.ep_group)
        norm = dense.sqrt().item()
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


@contextlib.contextmanager
def update_skipped(engine):
    """Make the optimizer step inside this block a no-op on weights and optimizer state (a step
    whose loss was non-finite on some rank; every rank enters it, so collectives stay matched).

    The step's gradients may be NaN (the micro-batches ran their real backward: the NaN check is
    read once per step, not per micro-batch), so a zero learning rate is not enough (Adam's
    0 x NaN is NaN). Each optimizer DeepSpeed builds is sent down its own overflow path, which
    discards the gradients and leaves weights and moments untouched:
    - ZeRO-1/2 (`DeepSpeedZeroOptimizer`): its overflow check reports overflow for this step;
    - ZeRO-0 bf16/fp16 (`FP16_UnfusedOptimizer`): its overflow checker reports overflow;
    - ZeRO-0 fp32 (the torch optimizer itself): the gradients are dropped (`grad = None`), which
      torch's optimizers skip.
    """
    opt = engine.optimizer
    for group in opt.param_groups:  # a second guard: nothing may move
        group["lr"] = 0.0
    patched = []

    def patch(obj, name, value):
        patched.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    if hasattr(opt, "check_grad_overflow") and hasattr(opt, "check_overflow"):  # ZeRO-1/2
        patch(opt, "check_grad_overflow", True)
        patch(opt, "check_overflow",
              lambda partition_gradients=True: setattr(opt, "overflow", True))
    elif hasattr(opt, "overflow_checker"):  # DeepSpeed's unfused fp16/bf16 wrapper
        patch(opt.overflow_checker, "check", lambda *a, **k: True)
    elif isinstance(opt, torch.optim.Optimizer):
        for p in engine.module.parameters():
            p.grad = None
    else:
        raise RuntimeError(f"no way to skip a step of optimizer {type(opt).__name__}")
    try:
        yield
    finally:
        for obj, name, old in reversed(patched):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_MISSING = object()


def gradient_accumulation_steps(cfg: Config, dp_size: int) -> int:
    """global batch / (micro batch x data-parallel size); 1 when no global batch is given."""
    tr = cfg.train
    if tr.global_batch_size is None:
        return 1
    return tr.global_batch_size // (tr.micro_batch_size * dp_size)


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices only (no weight decay on biases and norms), split into DeepSpeed's MoE
    groups so the engine reduces expert gradients over the expert-data-parallel group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def _count_expert_partitions_on_every_tp_rank(model: torch.nn.Module) -> None:
    """ZeRO-1/2 partition each expert group's flat buffer over its expert-data group, which
    spans the tensor group (layout.edp_groups), so every rank holds a disjoint piece; DeepSpeed's
    ZeRO norm counts a parameter's piece on TP rank != 0 only when it is tagged model-parallel
    (it sums over the data-parallel group, then the tensor group): tag the experts so each piece
    counts once. Dense replicated parameters stay untagged (counted on TP rank 0)."""
    from deepspeed.moe.utils import is_moe_param

    for p in model.parameters():
        if is_moe_param(p):
            p.tensor_model_parallel = True


def build_engine(model: torch.nn.Module, cfg: Config, layout: ParallelLayout,
                 extra_ds: Optional[dict] = None):
    """deepspeed.initialize with torch's fused AdamW (not DeepSpeed's JIT-built FusedAdam) and
    the layout as its model-parallel unit (`mpu`): ZeRO partitions and dense gradients follow
    the layout's data-parallel group, expert gradients its expert-data groups."""
    import deepspeed

    tr = cfg.train
    if layout.tp > 1 and cfg.parallel.zero_stage >= 1:
        _count_expert_partitions_on_every_tp_rank(model)
    groups = optimizer_param_groups(model, tr.weight_decay)
    # fused: one kernel per step on CUDA and on CPU (4x faster than foreach on CPU, measured).
    opt = torch.optim.AdamW(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2),
                            eps=tr.adam_eps, weight_decay=tr.weight_decay, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=deepspeed_config(cfg, layout, extra_ds),
                                           mpu=layout, dist_init_required=False)
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine,  # safe loads
                                                    expert_writers=layout.tp)
    engine.own_clipping = _own_clipping(cfg)
    engine.grad_norm_groups = GradNormGroups.of(model)
    _cached_zero_grad(engine)
    if cfg.parallel.zero_stage == 0 and layout.world_size == 1:
        _identity_allreduce(engine)
    return engine


def _identity_allreduce(engine) -> None:
    """One process: DeepSpeed's ZeRO-0 gradient "all-reduce" would still flatten every
    gradient, reduce over a group of one, scale by 1/1 and copy back (1.5 ms of a 22 ms CPU step
    at bench_train's small shape), an identity but for one thing kept here: at the accumulation
    boundary a parameter without a gradient (an expert no token chose) gets a zero one, so Adam
    steps it (its moments decay, weight decay applies) as on more processes."""
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel()]

    def allreduce_gradients(bucket_size=None):
        if engine.is_gradient_accumulation_boundary():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = allreduce_gradients


def _cached_zero_grad(engine) -> None:
    """DeepSpeed's `engine.zero_grad` (ZeRO-0 fp32 calls it after every optimizer step) sets
    every parameter's gradient to None by walking `named_parameters()`, 0.5 ms of a 22 ms CPU step
    at bench_train's small shape; the same on the parameter list taken once."""
    params = list(engine.module.parameters())

    def zero_grad():
        for p in params:
            p.grad = None

    engine.zero_grad = zero_grad
