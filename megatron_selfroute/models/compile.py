"""--compile: torch.compile of each transformer block's dense parts, in place.

Compiled per block, torchtitan style, but below the block: the LayerNorms, the attention module,
a dense block's MLP and a shared expert are each compiled with `nn.Module.compile` (in place, so
parameter names and checkpoints do not change). The MoE layer stays eager: its routing produces
data-dependent shapes (tokens per expert) that would recompile or break every graph, and it
receives the step's `RoutingContext` (iteration, token ids), which a compiled block would guard
on. Modules of the same structure share one compiled graph (PyTorch inlines nn.Module attributes
as graph inputs), so a 12-block model compiles each kind of part once, not 12 times.
"""
from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every Block's dense parts in place; returns how many modules were compiled."""
    from megatron_selfroute.models.transformer import Block

    n = 0
    for block in model.modules():
        if not isinstance(block, Block):
            continue
        parts = [block.ln_1, block.attn, block.ln_2, block.shared_mlp]
        if not block.is_moe:
            parts.append(block.mlp)
        for part in parts:
            if part is not None:
                part.compile(backend=backend)
                n += 1
    return n
