"""GPT-2-style transformer pieces written for one device (no torch.distributed here).

Parameter names follow Hugging Face GPT-2 (`ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`) so checkpoints map one-to-one; weights are `nn.Linear` layout
([out, in]), the transpose of Hugging Face's `Conv1D`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_selfroute.config import ModelConfig
from megatron_selfroute.models.recompute import maybe_checkpoint


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    """LayerNorm with or without bias (--disable-bias-layernorm)."""
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon,
                        bias=not cfg.disable_bias_layernorm)


class MLP(nn.Module):
    """Feed-forward block (also one expert): c_fc -> GELU -> c_proj."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, bias: bool,
                 gelu_approximation: str = "tanh") -> None:
        super().__init__()
        self.c_fc = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.c_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.gelu_approximation = gelu_approximation

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approximation))


class SelfAttention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention: causal (GPT) or over all
    tokens (ViT encoder)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        bias = not cfg.disable_bias_linear
        self.is_causal = causal
        self.num_heads = cfg.num_attention_heads
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=bias)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.attn_dropout = cfg.attention_dropout
        self.resid_dropout = nn.Dropout(cfg.hidden_dropout)
        self.recompute_core = False  # selective recompute of softmax(QK^T)V (models/recompute)
        self.tp_rng = None  # TP: the model's tensor-parallel dropout stream (set by TP)

    def forward(self, x_BSD: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        b, s, _ = x_BSD.shape
        # d: this rank's width (all heads on one device; H/T heads under tensor parallelism)
        qkv = self.c_attn(x_BSD)
        d = qkv.shape[-1] // 3
        q, k, v = qkv.split(d, dim=2)
        # [B, S, d] -> [B, heads, S, d/heads]
        q, k, v = (t.view(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))
        y = maybe_checkpoint(self.recompute_core and self.training, self._core, q, k, v,
                             attn_mask, rng=self.tp_rng if self.attn_dropout > 0 else None)
        y = y.transpose(1, 2).contiguous().view(b, s, d)
        return self.resid_dropout(self.c_proj(y))


    def _core(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        drop = self.attn_dropout if self.training else 0.0
        if drop > 0 and self.tp_rng is not None:  # this rank's heads: their own masks
            return _forked(self.tp_rng, self._sdpa, q, k, v, attn_mask, drop)
        return self._sdpa(q, k, v, attn_mask, drop)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
              drop: float) -> Tensor:
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop,
                                                  is_causal=self.is_causal)
        # attn_mask: bool [B, 1, S, S], True = may attend (already causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)


@torch.compiler.disable
def _forked(rng, fn: Callable, *args):
    """fn(*args) drawing from the tensor-parallel stream `rng` (outside any compiled graph:
    it swaps generator states)."""
    with rng.fork(args[0].device):
        return fn(*args)


class Block(nn.Module):
    """Pre-LayerNorm transformer block, causal (GPT) or bidirectional (ViT), whose MLP is dense
    or an MoE layer, with optional stochastic depth on both residual branches (DeiT)."""

    def __init__(self, cfg: ModelConfig, mlp: nn.Module, causal: bool = True,
                 drop_path: float = 0.0, shared_mlp: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.ln_1 = layer_norm(cfg)
        self.attn = SelfAttention(cfg, causal)
        self.ln_2 = layer_norm(cfg)
        self.mlp = mlp
        self.is_moe = not isinstance(mlp, MLP)
        # A shared expert (--moe-shared-expert-intermediate-size): a dense MLP beside the MoE
        # module (outside it, and named without "expert", for DeepSpeed's checkpoint code).
        self.shared_mlp = shared_mlp
        self.mlp_dropout = nn.Dropout(cfg.hidden_dropout)
        self.recompute_modules: frozenset = frozenset()  # selective recompute (set_recompute)
        if drop_path > 0:
            from timm.layers import DropPath  # the [vision] extra; GPT never needs it

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x_BSD: Tensor, attn_mask: Optional[Tensor] = None,
                ctx: Optional[Any] = None) -> tuple[Tensor, Tensor]:
        """Returns the new residual stream and this block's router losses (0 for dense);
        `ctx` is the forward's `RoutingContext`, read by an MoE layer."""
        rc = self.recompute_modules if self.training else frozenset()
        ln = "layernorm" in rc
        x_BSD = x_BSD + self.drop_path(self.attn(maybe_checkpoint(ln, self.ln_1, x_BSD),
                                                 attn_mask))
        h_BSD = maybe_checkpoint(ln, self.ln_2, x_BSD)
        if self.is_moe:
            y_BSD, aux = maybe_checkpoint("moe" in rc, self.mlp, h_BSD, ctx)
            if self.shared_mlp is not None:
                y_BSD = y_BSD + maybe_checkpoint("shared_experts" in rc, self.shared_mlp, h_BSD)
        else:
            y_BSD = maybe_checkpoint("mlp" in rc, self.mlp, h_BSD)
            aux = x_BSD.new_zeros((), dtype=torch.float32)
        return x_BSD + self.drop_path(self.mlp_dropout(y_BSD)), aux

    def set_recompute(self, modules: frozenset) -> None:
        """Selective recompute of these parts (models/recompute.py MODULES)."""
        self.recompute_modules = frozenset(modules)
        self.attn.recompute_core = "core_attn" in modules
