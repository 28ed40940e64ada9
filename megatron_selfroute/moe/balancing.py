"""Balancing that is not a loss: the aux-loss-free expert bias, and balanced hash tables.

Expert bias (DeepSeek-V3; Megatron core `--moe-router-enable-expert-bias`): each router with
`load_bias` keeps a per-expert fp32 bias used for selection only (`Router.select`). The training
loop adds every micro-batch's routed counts (once per micro-batch: read after its forward, so
neither activation recompute nor evaluation counts again) to an `ExpertBiasUpdater`; after an
optimizer step that was not skipped, the counts are summed over the data-parallel ranks and each
layer applies `bias_e += rate * sign(mean load - load_e)`. Every rank sees the same sums, so the
bias stays identical on every rank without a broadcast.

Balanced hash tables (`--router-type hash --hash-assignment balanced`): before training from
scratch, the training split's token frequencies (`data/token_frequency.py`) give each hash
router the greedy balanced table of `router.balanced_hash_table`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megatron_selfroute.moe.router import HashRouter, Router, balanced_hash_table
from megatron_selfroute.parallel.groups import all_reduce_small


def bias_routers(model: nn.Module) -> list[Router]:
    """The routers of `model` (block order) that carry an expert bias."""
    from megatron_selfroute.models.common import moe_layers

    return [layer.router for layer in moe_layers(model) if layer.router.load_bias is not None]


class ExpertBiasUpdater:
    """Sums a step's routed counts [L, E] and updates the expert biases after the step."""

    def __init__(self, model: nn.Module, rate: float, group=None) -> None:
        self.routers = bias_routers(model)
        self.rate = rate
        self.group = group
        self.counts: Optional[Tensor] = None

    def __bool__(self) -> bool:
        return bool(self.routers)

    def add(self, counts_LE: Tensor) -> None:
        """One micro-batch's routed token-slots per expert (all MoE layers)."""
        c = counts_LE.detach().to(torch.int64)
        self.counts = c.clone() if self.counts is None else self.counts + c

    def step(self, skipped: bool) -> None:
        """After the optimizer step: update (unless the step was skipped), then reset. Every
        data-parallel rank calls it (the all-reduce is collective)."""
        counts, self.counts = self.counts, None
        if skipped or counts is None:
            return
        counts = all_reduce_small(counts, group=self.group)
        for router, c in zip(self.routers, counts, strict=True):
            router.update_load_bias(c, self.rate)

    def stats(self) -> dict[str, float]:
        """Per layer: the bias range (max - min) and its largest magnitude, for logging."""
        out = {}
        for i, r in enumerate(self.routers):
            b = r.load_bias.detach().float().cpu()
            out[f"moe_layer_{i}/expert_bias_range"] = float(b.max() - b.min())
            out[f"moe_layer_{i}/expert_bias_max_abs"] = float(b.abs().max())
        return out


def hash_routers(model: nn.Module) -> list[HashRouter]:
    """The hash routers of `model` in block order."""
    from megatron_selfroute.models.common import moe_layers

    return [layer.router for layer in moe_layers(model) if isinstance(layer.router, HashRouter)]


def balance_hash_tables(model: nn.Module, freq_V: Tensor) -> Tensor:
    """Give every balanced hash router the greedy table of token frequencies `freq_V` (the
    padded vocabulary; per-layer tables relabel their experts); returns the base table."""
    routers = [r for r in hash_routers(model) if r.assignment == "balanced"]
    if not routers:
        return torch.empty(0)
    vocab = routers[0].table.shape[0]
    freq = torch.zeros(vocab, dtype=torch.float64)
    freq[: min(vocab, freq_V.numel())] = freq_V.to(torch.float64)[:vocab]
    table = balanced_hash_table(freq, routers[0].num_experts, routers[0].topk)
    for r in routers:
        r.set_table(table)
    return table
