"""Vision Transformer (DeiT) built from the project's blocks, dense or MoE, for one device.

DeiT conventions (timm `VisionTransformer` as DeiT uses it): a conv patch embedding, a class
token, learned absolute positions, pre-LayerNorm blocks with *bidirectional* attention and exact
GELU, LayerNorm epsilon 1e-6, stochastic depth rising linearly from 0 to --drop-path over the
blocks, a final LayerNorm and a linear head on the class token. Parameter names reuse the GPT-2
block names (`ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`) so MoE
layers, routers and checkpoints work as in GPTModel.

MoE: any block's MLP may be an `MoELayer` (any router). The DeiT-S MoE setting of the paper puts
MoE in blocks 1, 3, ..., 11 ("every 2", the V-MoE convention; Megatron-DeepSpeed
`--expert-interval 2`; pattern `[0,1]*6`), 4 experts top-2.

Built for one device like GPTModel (`init=False` leaves the experts as meta placeholders for
`parallelize_vit`). Initialisation is a pure function of (seed, parameter name) with global expert
ids, so every process count and expert-parallel layout starts from the same model: truncated normal
(std --init-method-std, DeiT's 0.02) for every weight matrix, the patch-embedding kernel, the
class token and the positions; zero biases; unit LayerNorm gains.

Model EMA (`enable_ema`): an fp32 buffer `ema_<name>` beside every parameter, on the module that
owns it, so DeepSpeed checkpoints carry it (expert EMAs go into the per-expert files) and it never
receives gradients; `_apply` keeps it fp32 under `.bfloat16()` (a 0.99996 EMA vanishes in bf16).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from megatron_selfroute.config import DEIT_PRESETS, Config, ModelConfig
from megatron_selfroute.models import recompute
from megatron_selfroute.models.common import (
    build_blocks,
    layout_free_names,
    mlp_flops_per_token,
    moe_layers,
    routing_counts,
    routing_ids,
)
from megatron_selfroute.models.transformer import layer_norm
from megatron_selfroute.moe.context import RoutingContext
from megatron_selfroute.moe.layer import MoELayer
from megatron_selfroute.parallel.expert_parallel import apply_expert_parallel
from megatron_selfroute.parallel.layout import ParallelLayout
from megatron_selfroute.parallel.tensor_parallel import (
    apply_tensor_parallel,
    full_shape,
    shard_full_tensor,
)
from megatron_selfroute.seeding import mix_seed

PRESETS = DEIT_PRESETS  # the DeiT shapes (config.py, where the --model flag reads them)


def ema_buffer_name(param_name: str) -> str:
    """The EMA buffer of parameter `param_name` (`enable_ema`): `ema_<leaf>` on its module."""
    owner, dot, leaf = param_name.rpartition(".")
    return f"{owner}{dot}ema_{leaf}"


@dataclass
class ViTConfig:
    """Image-specific shape and regularisation (the transformer shape lives in ModelConfig)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.1

    @property
    def num_patches(self) -> int:
        """Patches per image ((img / patch)^2)."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Sequence length: patches + the class token."""
        return self.num_patches + 1


def every_second_block(num_layers: int) -> str:
    """V-MoE "every 2" placement (MoE in blocks 1, 3, ...) as a --moe-layer-freq pattern."""
    return str([i % 2 for i in range(num_layers)])


def apply_vit_defaults(model: ModelConfig) -> None:
    """timm/DeiT block details that differ from GPT-2: exact GELU and LayerNorm eps 1e-6."""
    model.gelu_approximation = "none"
    model.layernorm_epsilon = 1e-6


def trunc_normal(shape: torch.Size, std: float, gen: torch.Generator) -> Tensor:
    """N(0, std^2) truncated to [-2 std, 2 std] (timm/DeiT init) by inverse CDF, like
    `nn.init.trunc_normal_` but fast with a generator."""
    cdf = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))  # Phi(-2)
    u = torch.empty(shape).uniform_(2 * cdf - 1, 1 - 2 * cdf, generator=gen)
    return u.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2 * std, 2 * std)


class VisionTransformer(nn.Module):
    """ViT/DeiT classifier: images [B, C, H, W] -> logits [B, classes] (+ router losses)."""

    def __init__(self, cfg: Config, vit: ViTConfig, init: bool = True) -> None:
        super().__init__()
        m, moe = cfg.model, cfg.moe
        if vit.img_size % vit.patch_size:
            raise ValueError(f"--patch-size {vit.patch_size} does not divide --img-size "
                             f"{vit.img_size}")
        self.cfg, self.vit = cfg, vit
        self.pattern = moe.layer_pattern(m.num_layers)
        d = m.hidden_size
        self.patch_embed = nn.Conv2d(vit.in_chans, d, vit.patch_size, vit.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, vit.num_tokens, d))
        self.pos_drop = nn.Dropout(m.hidden_dropout)
        rates = torch.linspace(0, vit.drop_path_rate, m.num_layers).tolist()  # DeiT's rule
        blocks = build_blocks(cfg, causal=False, drop_path_rates=rates)
        self.blocks = nn.ModuleList(blocks)
        self.norm = layer_norm(m)
        self.head = nn.Linear(d, vit.num_classes)
        self.recompute = recompute.resolve(m)
        for block in blocks:
            block.set_recompute(self.recompute.modules)
        self._ema: list[tuple[nn.Module, str, nn.Parameter]] = []
        if init:
            parallelize_vit(self, ParallelLayout.single(cfg))

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in block order."""
        return moe_layers(self)

    def init_weights(self, seed: int) -> None:
        """Seeded per (global) parameter name: trunc-normal weights, zero biases, unit gains."""
        std = self.cfg.model.init_method_std
        names = layout_free_names(self)
        with torch.no_grad():
            for name, p in self.named_parameters():
                canonical = names[name]
                if ".ln_" in name or name.startswith("norm."):
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    gen = torch.Generator().manual_seed(
                        mix_seed(seed, zlib.crc32(canonical.encode())))
                    # the full tensor, then this rank's shard (the tensor itself at TP = 1)
                    p.copy_(shard_full_tensor(p, trunc_normal(full_shape(p), std, gen)))

    def forward(self, images: Tensor, token_index: Optional[Tensor] = None,
                iteration: int = 0) -> tuple[Tensor, Tensor]:
        """images [B, C, H, W]; token_index [B, S] global token ids for the random router.
        Returns fp32 logits [B, classes] and the summed fp32 router losses."""
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, patches, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        ctx = RoutingContext(token_index, None, iteration)
        x, aux = recompute.run_blocks(self.blocks, x, None, ctx, self.recompute, self.training)
        return self.head(self.norm(x)[:, 0]).float(), aux

    def routing_counts(self) -> tuple[Tensor, Tensor]:
        """Last forward's routes per expert [L_moe, E] and dropped routes [L_moe] (int64)."""
        return routing_counts(self.moe_layers)

    def routing_ids(self) -> Tensor:
        """Last forward's expert ids [L_moe, T, K] (int64)."""
        return routing_ids(self.moe_layers)

    # ---- model EMA --------------------------------------------------------------------------

    def enable_ema(self) -> None:
        """Add an fp32 EMA buffer beside every parameter, initialised to its current value."""
        for name, p in list(self.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            buffer = ema_buffer_name(leaf)
            owner.register_buffer(buffer, p.detach().float().clone(), persistent=True)
            self._ema.append((owner, buffer, p))

    @property
    def has_ema(self) -> bool:
        """Whether `enable_ema` was called."""
        return bool(self._ema)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * param (timm ModelEma, after each step)."""
        emas = [owner._buffers[b] for owner, b, _ in self._ema]
        torch._foreach_lerp_(emas, [p.detach().float() for _, _, p in self._ema], 1.0 - decay)

    def ema_parameters(self) -> dict[str, Tensor]:
        """Parameter name -> EMA value (in the parameter's dtype), for `functional_call`."""
        names = {id(p): n for n, p in self.named_parameters()}
        return {names[id(p)]: owner._buffers[b].to(p.dtype) for owner, b, p in self._ema}

    def _apply(self, fn, recurse: bool = True):
        """Device moves reach the EMA buffers, dtype casts do not (they stay fp32)."""
        kept = [owner._buffers[b] for owner, b, _ in self._ema]
        super()._apply(fn, recurse)
        for (owner, b, _), old in zip(self._ema, kept, strict=True):
            owner._buffers[b] = old.to(device=owner._buffers[b].device)
        return self


def parallelize_vit(model: VisionTransformer, layout: ParallelLayout,
                    init: bool = True) -> VisionTransformer:
    """Apply `layout` to `VisionTransformer(..., init=False)`: this rank's experts, the groups,
    then (unless `init` is False) the seeded initialisation. Enable the EMA afterwards."""
    if model.has_ema:
        raise RuntimeError("enable_ema() after parallelize_vit (the EMA copies this rank's "
                           "initialised weights)")
    apply_expert_parallel(model, layout)
    apply_tensor_parallel(model, layout)  # the blocks; patch embedding and head replicated
    if init:
        model.init_weights(model.cfg.train.seed)
    return model


def vit_flops_per_image(cfg: Config, vit: ViTConfig) -> float:
    """Forward matmul FLOPs per image on active parameters (MoE: k experts): patch embedding,
    per block 2 x (QKV + output) x S + attention 2 x 2 x S^2 x D + MLP or k experts (+ router),
    and the head. Training = 3x forward."""
    m = cfg.model
    d, s = m.hidden_size, vit.num_tokens
    patches = 2.0 * vit.num_patches * vit.in_chans * vit.patch_size ** 2 * d
    attention = m.num_layers * (2 * 4 * d * d * s + 2 * 2 * s * s * d)
    return patches + attention + mlp_flops_per_token(cfg) * s + 2 * d * vit.num_classes


def describe(cfg: Config, vit: ViTConfig) -> str:
    """One line: shape, tokens, parameters per image and MoE placement (for the log)."""
    m = cfg.model
    moe_blocks = [i for i, v in enumerate(cfg.moe.layer_pattern(m.num_layers)) if v]
    gflops = vit_flops_per_image(cfg, vit) / 1e9
    placement = f"MoE blocks {moe_blocks}" if moe_blocks else "dense"
    return (f"ViT depth {m.num_layers} dim {m.hidden_size} heads {m.num_attention_heads} "
            f"patch {vit.patch_size} img {vit.img_size} ({vit.num_tokens} tokens), "
            f"{vit.num_classes} classes, drop path {vit.drop_path_rate}, {placement}, "
            f"{gflops:.4g} GFLOPs per image forward")
