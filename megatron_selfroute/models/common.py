"""Scaffolding both model families share: MoE placement and the blocks, layout-free parameter
names for seeded initialisation, routing counts, and the FLOPs of the MLP part."""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor, nn

from megatron_selfroute.config import Config
from megatron_selfroute.models.transformer import MLP, Block
from megatron_selfroute.moe.layer import MoELayer
from megatron_selfroute.moe.router import ROUTERS

_EXPERT = re.compile(r"\.deepspeed_experts\.(\d+)\.")


def build_blocks(cfg: Config, causal: bool,
                 drop_path_rates: Optional[list[float]] = None) -> list[Block]:
    """One block per layer; MoE where --moe-layer-freq puts it (any router), else a dense MLP."""
    m, moe = cfg.model, cfg.moe
    blocks, moe_index = [], 0
    for i, is_moe in enumerate(moe.layer_pattern(m.num_layers)):
        shared = None
        if is_moe:
            mlp = MoELayer(m, moe, i, moe_index, cfg.train.seed)
            moe_index += 1
            if moe.moe_shared_expert_intermediate_size:
                shared = MLP(m.hidden_size, moe.moe_shared_expert_intermediate_size,
                             not m.disable_bias_linear, m.gelu_approximation)
        else:
            mlp = MLP(m.hidden_size, m.ffn_size, not m.disable_bias_linear, m.gelu_approximation)
        rate = drop_path_rates[i] if drop_path_rates else 0.0
        blocks.append(Block(m, mlp, causal, rate, shared))
    return blocks


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in block order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def layout_free_names(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the name it has in the one-process model (a local expert id replaced by
    its global id): the key of every parameter's seeded initialisation."""
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, MoELayer)}
    out = {}
    for name, _ in model.named_parameters():
        match = _EXPERT.search(name)
        if match:
            layer = layers[name.split(".deepspeed_moe.")[0]]
            gid = layer.experts.global_id(int(match.group(1)))
            out[name] = _EXPERT.sub(f".deepspeed_experts.{gid}.", name)
        else:
            out[name] = name
    return out


def routing_ids(layers: list[MoELayer]) -> Tensor:
    """Last forward's expert ids per MoE layer and token [L_moe, T, K] (int64; the router's
    order, so [..., 0] is each token's top-1 expert)."""
    return torch.stack([lay.last_ids for lay in layers])


def routing_counts(layers: list[MoELayer]) -> tuple[Tensor, Tensor]:
    """Last forward's routes per expert [L_moe, E] and dropped routes [L_moe] (int64)."""
    return (torch.stack([lay.last_tokens_per_expert for lay in layers]),
            torch.stack([lay.last_dropped for lay in layers]))


def mlp_flops_per_token(cfg: Config) -> float:
    """Forward matmul FLOPs per token of every block's MLP: a dense MLP, or k experts plus the
    router's declared FLOPs, plus a shared expert (2 x 2 x D x FFN per MLP)."""
    m, moe = cfg.model, cfg.moe
    d, flops = m.hidden_size, 0.0
    for is_moe in moe.layer_pattern(m.num_layers):
        if is_moe:
            ffn = moe.moe_ffn_hidden_size or m.ffn_size
            flops += moe.moe_router_topk * 2 * 2 * d * ffn
            flops += ROUTERS[moe.router_type].flops_per_token(d, moe.num_experts)
            flops += 2 * 2 * d * (moe.moe_shared_expert_intermediate_size or 0)
        else:
            flops += 2 * 2 * d * m.ffn_size
    return flops
