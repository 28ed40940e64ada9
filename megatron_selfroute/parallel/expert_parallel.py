"""Expert parallelism applied to a model built for one device (the step every model family's
`parallelize` shares)."""
from __future__ import annotations

import torch
from torch import nn

from megatron_selfroute.parallel.layout import ParallelLayout


def apply_expert_parallel(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Give every MoE layer of `model` this rank's block of experts (allocated, uninitialised,
    on the device of the model's other weights) and the layout's expert-parallel group."""
    from megatron_selfroute.moe.layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        return model
    if not layout.moe:
        raise ValueError("an MoE model needs a layout made from an MoE config")
    device = next((p.device for p in model.parameters() if not p.is_meta),
                  torch.device("cpu"))
    group = layout.ep_group
    for layer in layers:
        layer.parallelize(layout.ep_rank, layout.ep, group, device)
    return model
