"""Megatron core's activation-recompute options, resolved once and applied by the models.

    --recompute-granularity full --recompute-method uniform --recompute-num-layers N
        checkpoint the input of every group of N consecutive blocks; backward re-runs the group
        (N = 1: every block on its own, what --recompute-activations did before issue 19)
    --recompute-granularity full --recompute-method block --recompute-num-layers N
        checkpoint the first N blocks individually; the others keep their activations
    --recompute-granularity selective --recompute-modules core_attn layernorm mlp moe shared_experts
        inside each block, re-run only the listed parts in backward (default core_attn: the
        attention softmax(QK^T)V, whose [heads, S, S] intermediates are the largest per FLOP);
        `mlp` is a dense block's MLP, `moe` a whole MoE layer (router, dispatch, experts)
    --recompute-activations = --recompute-granularity selective (Megatron's meaning)

A re-run MoE layer repeats its all-to-all in backward (every rank re-runs the same layers, so
the collectives stay matched) and its routing is recomputed identically (routers are pure
functions of their inputs and buffers; the random router of (seed, layer, iteration, token)).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from megatron_selfroute.config import ConfigError, ModelConfig

MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts")


@dataclass(frozen=True)
class RecomputePlan:
    granularity: Optional[str] = None  # None, "full" or "selective"
    method: Optional[str] = None
    num_layers: Optional[int] = None
    modules: frozenset = frozenset()

    def describe(self) -> str:
        if self.granularity is None:
            return "off"
        if self.granularity == "full":
            return f"full, method {self.method}, {self.num_layers} layers"
        return f"selective ({', '.join(sorted(self.modules))})"

    def full_blocks(self, num_blocks: int) -> list[list[int]]:
        """Groups of block indices checkpointed as one unit (full granularity); the blocks not
        listed run normally."""
        if self.granularity != "full":
            return []
        if self.method == "block":
            return [[i] for i in range(min(self.num_layers, num_blocks))]
        n = self.num_layers
        return [list(range(i, min(i + n, num_blocks))) for i in range(0, num_blocks, n)]


def resolve(m: ModelConfig) -> RecomputePlan:
    """The plan the flags ask for (ConfigError naming the flag for a contradiction)."""
    gran = m.recompute_granularity
    if m.recompute_activations:
        if gran not in (None, "selective"):
            raise ConfigError(f"--recompute-activations (selective) conflicts with "
                              f"--recompute-granularity {gran}")
        gran = "selective"
    if gran != "full" and (m.recompute_method or m.recompute_num_layers):
        raise ConfigError("--recompute-method/--recompute-num-layers need "
                          "--recompute-granularity full")
    modules = frozenset(m.recompute_modules)
    unknown = modules - set(MODULES)
    if unknown:
        raise ConfigError(f"--recompute-modules {' '.join(sorted(unknown))}: choose from "
                          f"{', '.join(MODULES)}")
    if gran == "full":
        method = m.recompute_method or "uniform"
        n = m.recompute_num_layers if m.recompute_num_layers is not None else (
            1 if method == "uniform" else m.num_layers)
        if not 1 <= n <= m.num_layers:
            raise ConfigError(f"--recompute-num-layers must be between 1 and --num-layers "
                              f"{m.num_layers}, got {n}")
        return RecomputePlan("full", method, n)
    if gran == "selective":
        if not modules:
            raise ConfigError("--recompute-granularity selective needs --recompute-modules")
        return RecomputePlan("selective", modules=modules)
    return RecomputePlan()


def _checkpoint(fn: Callable, *args, rng=None):
    """Non-reentrant checkpoint; with `rng` (a tensor-parallel dropout stream the region draws
    from) the recompute replays that stream too (torch replays the default generators itself).
    Only then is a `context_fn` given: under torch.compile a custom one is refused."""
    if rng is None:
        return checkpoint(fn, *args, use_reentrant=False)
    from megatron_selfroute.parallel.tensor_parallel import checkpoint_contexts

    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(checkpoint_contexts, rng))


def maybe_checkpoint(enabled: bool, fn: Callable, *args, rng=None):
    """fn(*args), recomputed in backward when `enabled` (non-reentrant checkpoint; `rng`: the
    tensor-parallel stream `fn` draws dropout from, if any)."""
    if enabled:
        return _checkpoint(fn, *args, rng=rng)
    return fn(*args)


def _dropout_stream(blocks):
    """The tensor-parallel stream the blocks' attention dropout draws from (None when none
    does)."""
    for block in blocks:
        attn = getattr(block, "attn", None)
        if getattr(attn, "tp_rng", None) is not None and attn.attn_dropout > 0:
            return attn.tp_rng
    return None


def run_blocks(blocks, x, attn_mask, ctx, plan: RecomputePlan, training: bool):
    """The residual stream through `blocks` with full-granularity recompute applied (selective
    recompute lives inside each block); returns (x, summed router losses)."""
    aux = x.new_zeros((), dtype=torch.float32)
    groups = plan.full_blocks(len(blocks)) if training else []
    starts = {g[0]: g for g in groups}
    i = 0
    while i < len(blocks):
        group = starts.get(i)
        if group is None:
            x, a = blocks[i](x, attn_mask, ctx)
            i += 1
        else:
            def run(x_in, group=group):
                total = x_in.new_zeros((), dtype=torch.float32)
                for j in group:
                    x_in, a_j = blocks[j](x_in, attn_mask, ctx)
                    total = total + a_j
                return x_in, total
            x, a = _checkpoint(run, x, rng=_dropout_stream(blocks[j] for j in group))
            i = group[-1] + 1
        aux = aux + a
    return x, aux
