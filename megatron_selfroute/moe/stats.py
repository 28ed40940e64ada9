"""Routing statistics as the paper measures utilisation.

Per MoE layer, from routed token-slot counts `counts_LE` (L layers, E experts): expert
fractions f_i = c_i / sum(c); Shannon entropy H = -sum f_i log f_i; normalised entropy H / log E
(1 = uniform); the maximum expert fraction; the fraction of routes dropped by capacity; and the
dead experts, those whose fraction is below 1 / (10 E).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_fractions(counts_LE: Tensor) -> Tensor:
    """f [L, E] in float64 (rows of zeros stay zero)."""
    c = counts_LE.to(torch.float64)
    return c / c.sum(-1, keepdim=True).clamp(min=1)


def normalized_entropy(counts_LE: Tensor) -> Tensor:
    """H / log E per layer [L] (0 log 0 = 0)."""
    f = expert_fractions(counts_LE)
    h = -(f * torch.where(f > 0, f.log(), torch.zeros_like(f))).sum(-1)
    return h / math.log(counts_LE.shape[-1])


def max_fraction(counts_LE: Tensor) -> Tensor:
    """Share of routed token-slots taken by the single most-used expert, per layer [L]."""
    return expert_fractions(counts_LE).max(-1).values


DEAD_FRACTION = 0.1
"""An expert is dead in a layer when its fraction is below DEAD_FRACTION / E."""


def dead_experts(counts_LE: Tensor) -> Tensor:
    """Number of experts per layer [L] whose routed fraction is below 1 / (10 E)."""
    f = expert_fractions(counts_LE)
    return (f < DEAD_FRACTION / counts_LE.shape[-1]).sum(-1)


def routing_metrics(counts_LE: Tensor, dropped_L: Tensor) -> dict[str, list[float]]:
    """Per-layer normalised entropy, max expert fraction, dropped fraction and dead experts
    (plain floats)."""
    total = counts_LE.sum(-1).to(torch.float64).clamp(min=1)
    return {
        "normalized_entropy": normalized_entropy(counts_LE).tolist(),
        "max_fraction": max_fraction(counts_LE).tolist(),
        "dropped_fraction": (dropped_L.to(torch.float64) / total).tolist(),
        "dead_experts": [float(v) for v in dead_experts(counts_LE).tolist()],
    }
