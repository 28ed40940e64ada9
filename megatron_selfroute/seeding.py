"""Seeding helpers shared by models, routers and data: exact integer mixing and counter-based
uniforms (no generator state, so results depend only on their inputs)."""
from __future__ import annotations

import torch
from torch import Tensor

_M64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps; Python ints, exact)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) & _M64
        h = (h * 0xBF58476D1CE4E5B9) & _M64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _to_signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def hash_uniform(key: int, counters: Tensor) -> Tensor:
    """Counter-based uniform (0, 1) values: splitmix64 finaliser of key + counter, 53 bits."""
    x = counters.to(torch.int64) * _to_signed(0x9E3779B97F4A7C15) + _to_signed(key)
    x = (x ^ _srl(x, 30)) * _to_signed(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _to_signed(0x94D049BB133111EB)
    x = x ^ _srl(x, 31)
    return (_srl(x, 11).to(torch.float64) + 0.5) / float(1 << 53)
