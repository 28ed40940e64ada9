"""GPT-2 language model, dense or MoE, written for one device (parallelism is applied outside).

Conventions: learned absolute positions, pre-LayerNorm blocks, GELU (tanh approximation by
default), output layer tied to the input embedding unless --untie-embeddings-and-output-weights,
vocabulary padded to a multiple of --make-vocab-size-divisible-by. The padded rows exist (they
count as parameters, as in the paper) but are never predicted: logits are sliced to the
tokenizer's vocabulary before any softmax, in training, evaluation and export alike.

Built for one device: `GPTModel(cfg)` is a complete, initialised single-process model.
`GPTModel(cfg, init=False)` leaves every expert as a meta-device placeholder, and
`parallelize_gpt(model, layout)` keeps this rank's experts, allocates them, wires the groups and
initialises. Initialisation is a pure function of (seed, parameter name) — expert names use global
expert ids — so every process count and expert-parallel layout starts from the same model.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_selfroute.config import Config
from megatron_selfroute.models import recompute
from megatron_selfroute.models.chunked_ce import linear_cross_entropy
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
    VocabParallelEmbedding,
    apply_tensor_parallel,
    copy_to_tp,
    full_shape,
    gather_last_dim,
    shard_full_tensor,
    sharded_param,
)
from megatron_selfroute.seeding import mix_seed


@dataclass
class GPTOutput:
    """Model outputs: logits [B, S, V] (when no labels), per-token loss [B, S], router loss."""

    logits: Optional[Tensor]
    loss: Optional[Tensor]
    aux_loss: Tensor


class GPTModel(nn.Module):
    """GPT-2 with Hugging Face parameter names (`transformer.h.{i}.attn.c_attn.weight`, ...)."""

    def __init__(self, cfg: Config, init: bool = True) -> None:
        super().__init__()
        m, moe = cfg.model, cfg.moe
        self.cfg = cfg
        self.vocab_size = m.vocab_size
        self.pattern = moe.layer_pattern(m.num_layers)
        blocks = build_blocks(cfg, causal=True)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(m.padded_vocab_size, m.hidden_size),
            wpe=nn.Embedding(m.positions, m.hidden_size),
            drop=nn.Dropout(m.hidden_dropout),
            h=nn.ModuleList(blocks),
            ln_f=layer_norm(m),
        ))
        self.lm_head = nn.Linear(m.hidden_size, m.padded_vocab_size, bias=False)
        if not m.untie_embeddings_and_output_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.recompute = recompute.resolve(m)
        for block in blocks:
            block.set_recompute(self.recompute.modules)
        self.ce_chunk = m.cross_entropy_chunk_size
        self.tp_group, self.vocab_start = None, 0  # set_tensor_parallel
        if init:
            parallelize_gpt(self, ParallelLayout.single(cfg))

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in block order."""
        return moe_layers(self)

    def init_weights(self, seed: int) -> None:
        """Seeded per parameter name: normal(std) weights, std/sqrt(2L) on residual outputs."""
        m = self.cfg.model
        std, out_std = m.init_method_std, m.init_method_std / math.sqrt(2 * m.num_layers)
        names = layout_free_names(self)
        with torch.no_grad():
            for name, p in self.named_parameters():
                canonical = names[name]
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or name.startswith("transformer.ln_f"):
                    p.fill_(1.0)
                else:
                    s = out_std if name.endswith("c_proj.weight") else std
                    gen = torch.Generator().manual_seed(
                        mix_seed(seed, zlib.crc32(canonical.encode())))
                    # the full tensor, then this rank's shard (the tensor itself at TP = 1)
                    full = torch.randn(full_shape(p), generator=gen, dtype=torch.float32) * s
                    p.copy_(shard_full_tensor(p, full))

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                token_index: Optional[Tensor] = None, iteration: int = 0) -> GPTOutput:
        """input_ids [B, S]; attention_mask optional bool [B, 1, S, S] (True = attend);
        token_index [B, S] global token positions for the random router (default arange);
        the routers see both, and the iteration, through one `RoutingContext`."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(input_ids)
                                  + self.transformer.wpe(position_ids))
        ctx = RoutingContext(token_index, input_ids, iteration)
        x, aux = recompute.run_blocks(self.transformer.h, x, attention_mask, ctx, self.recompute,
                                      self.training)
        x = self.transformer.ln_f(x)
        if self.tp_group is not None:  # vocabulary-parallel output layer: logits never gathered
            return self._tp_output(x, labels, aux)
        if labels is not None and self.ce_chunk:  # never holds the [tokens, vocab] logits
            loss = linear_cross_entropy(x.reshape(b * s, -1), self.lm_head.weight,
                                        labels.reshape(-1), self.vocab_size, self.ce_chunk)
            return GPTOutput(None, loss.view(b, s), aux)
        logits = self.lm_head(x)[..., : self.vocab_size]
        if labels is None:
            return GPTOutput(logits, None, aux)
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), labels.reshape(-1),
                               reduction="none").view(b, s)
        return GPTOutput(None, loss, aux)

    def set_tensor_parallel(self, group, tp: int, rank: int) -> None:
        """Vocabulary-parallel token embedding and output layer over `group` (called by
        `apply_tensor_parallel`, before initialisation)."""
        m = self.cfg.model
        wte = VocabParallelEmbedding(self.transformer.wte, group, tp, rank)
        self.transformer.wte = wte
        if m.untie_embeddings_and_output_weights:
            head = nn.Linear(1, 1, bias=False)  # a holder with the one-device module name
            head.weight = sharded_param(self.lm_head.weight, lambda w: w[wte.start:wte.end], 0)
            self.lm_head = head
        else:
            self.lm_head.weight = wte.weight
        self.tp_group, self.vocab_start = group, wte.start

    def _tp_output(self, x: Tensor, labels: Optional[Tensor], aux: Tensor) -> GPTOutput:
        b, s = x.shape[:2]
        x = copy_to_tp(x, self.tp_group)
        if labels is None:  # evaluation and generation: the logits gathered over the vocabulary
            logits = gather_last_dim(self.lm_head(x), self.tp_group)[..., : self.vocab_size]
            return GPTOutput(logits, None, aux)
        loss = linear_cross_entropy(x.reshape(b * s, -1), self.lm_head.weight,
                                    labels.reshape(-1), self.vocab_size,
                                    self.ce_chunk or b * s, tp=(self.tp_group, self.vocab_start))
        return GPTOutput(None, loss.view(b, s), aux)

    def routing_counts(self) -> tuple[Tensor, Tensor]:
        """Last forward's routes per expert [L_moe, E] and dropped routes [L_moe] (int64)."""
        return routing_counts(self.moe_layers)

    def routing_ids(self) -> Tensor:
        """Last forward's expert ids [L_moe, T, K] (int64)."""
        return routing_ids(self.moe_layers)


def gpt_flops_per_token(cfg: Config) -> float:
    """Forward matmul FLOPs per token on active parameters (MoE: k experts), Megatron-style:
    2 x (QKV + attention output + MLP or k experts + router) per layer, attention scores and
    values 2 x 2 x S x D per layer, and the output layer 2 x D x V. Training = 3x forward."""
    return sum(gpt_flops_breakdown(cfg).values())


def gpt_flops_breakdown(cfg: Config) -> dict[str, float]:
    """`gpt_flops_per_token` by part: attention (projections and scores), MLP (dense MLPs,
    active experts, routers and shared experts) and the output layer."""
    m = cfg.model
    d, s = m.hidden_size, m.seq_length
    return {"attention": float(m.num_layers * (2 * (3 * d * d + d * d) + 2 * 2 * s * d)),
            "mlp": float(mlp_flops_per_token(cfg)),
            "output_layer": float(2 * d * m.padded_vocab_size)}


def parallelize_gpt(model: GPTModel, layout: ParallelLayout, init: bool = True) -> GPTModel:
    """Apply `layout` to a model built by `GPTModel(cfg, init=False)`: keep and allocate this
    rank's experts, wire the expert-parallel groups, then (unless `init` is False, for a model
    whose weights are loaded next) initialise every weight from (seed, name, global expert id)."""
    apply_expert_parallel(model, layout)
    apply_tensor_parallel(model, layout)
    if init:
        model.init_weights(model.cfg.train.seed)
    return model


def num_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Unique parameters (tied weights counted once)."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())
