"""Routers: how each token's expert logits are made; one base class does everything else.

A router turns the MoE layer's input `x_TD` (T tokens, hidden D; the post-LayerNorm input, the
same tensor a learned router sees) into `logits_TE` over E experts. The base class then picks the
top-k experts (`ids_TK`), computes their weights (`probs_TK`: softmax over the k selected logits as
in the paper, or with `pre_softmax` softmax over all E then top-k), applies the optional expert
capacity (dropping routes beyond it), counts tokens per expert and computes the optional Switch
auxiliary loss and z-loss.

| router       | logits                                   | learned parameters |
| ------------ | ---------------------------------------- | ------------------ |
| self         | x[..., dims] (last N coordinates)        | 0                  |
| learned      | x @ W, W in R^{D x E}, fp32              | D x E per layer    |
| fixed-random | x @ R, R frozen fp32 buffer (seed,layer) | 0                  |
| random       | hash(seed, layer, iteration, token) -> N(0,1) | 0             |
| hash         | none: a fixed table token id -> k experts, weights 1/k | 0     |

Scores and selection (every router but hash): with `--moe-router-score-function softmax` (the
paper) top-k picks the k largest logits and their weights are the softmax over the k selected
(`--moe-router-pre-softmax`: softmax over all E, then top-k); with `sigmoid` (DeepSeek-V3) top-k
picks the k largest sigmoid scores and the weights are those scores normalised over the k.
Aux-loss-free balancing (`--moe-router-enable-expert-bias`) adds a per-expert fp32 bias to what
top-k compares, for selection only: to the logits (softmax over the selected k), to the
probabilities (pre-softmax) or to the sigmoid scores; the weights come from the unbiased scores.
The bias is updated after each optimizer step by `update_load_bias` (Megatron core's rule).

Self-routing reads the post-LayerNorm hidden state, so the LayerNorm gain (and bias) on the N
routing coordinates act as a learned per-expert temperature (and bias) of the logits.

A router class owns its facts: the options it owns (`options`) and its other validation rules
(`check`), its learned-parameter count and FLOPs (`learned_parameters`, `flops_per_token`), the
config fields a checkpoint must match on resume (`checkpoint_fields`), and its Hugging Face export
(`hf_kind`, `hf_export_state`). Per-forward inputs (token positions, token ids, iteration) arrive
in one `RoutingContext`. Adding a router = one subclass decorated with `@register_router(name)`;
flags, validation, FLOP counts, checkpoints, converters and tests read the registry `ROUTERS`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_selfroute.config import Config, ConfigError, MoEConfig
from megatron_selfroute.moe.context import RoutingContext
from megatron_selfroute.parallel.tensor_parallel import reduce_from_tp
from megatron_selfroute.seeding import hash_uniform, mix_seed


def count_per_expert(ids: Tensor, num_experts: int) -> Tensor:
    """int64 number of entries of `ids` equal to each of 0..num_experts-1.

    `torch.bincount` would do, but on CUDA it reads `ids.max()` back to the host to size its
    output: one device sync per call, several per MoE layer. A 1-D `scatter_add_` never syncs, is
    as fast as bincount on CPU, and is among the operations torch runs deterministically under
    `torch.use_deterministic_algorithms(True)`."""
    flat = ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


@dataclass
class RouterOutput:
    """Routing decision for T tokens with top-k K over E experts."""

    probs_TK: Tensor  # fp32 combine weights of the selected experts (0 where dropped)
    ids_TK: Tensor  # int64 expert ids
    keep_TK: Optional[Tensor]  # bool, False for routes dropped by capacity; None = dropless
    tokens_per_expert_E: Tensor  # int64 routes assigned to each expert (before dropping)
    dropped: Tensor  # int64 scalar: routes dropped by capacity
    aux_loss: Tensor  # fp32 scalar (already multiplied by its coefficient)
    z_loss: Tensor  # fp32 scalar (already multiplied by its coefficient)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Router(nn.Module):
    """Base router: top-k, weights, capacity, counting and losses; subclasses make logits.

    Class-level facts a subclass may override (read by validation, FLOP counts, checkpoints and
    the Hugging Face export without instantiating anything):
    """

    name: ClassVar[str] = ""
    # MoEConfig fields only this router reads; any other router rejects non-default values.
    options: ClassVar[tuple[str, ...]] = ()
    # MoEConfig fields that change the model a checkpoint holds (checked on resume).
    checkpoint_fields: ClassVar[tuple[str, ...]] = ()
    # False when the selected logits carry no gradient anyway (k = 1 needs no pre-softmax).
    trainable_scores: ClassVar[bool] = True
    # The router kind of the Hugging Face remote-code model, or None (not exportable).
    hf_kind: ClassVar[Optional[str]] = None
    hf_refusal: ClassVar[str] = "has no Hugging Face form"
    # True for routers that read `ctx.token_ids` (language models only); their constructor
    # takes `vocab_size=`.
    reads_token_ids: ClassVar[bool] = False
    # fp32 buffers that stay fp32 when the model is cast (bf16 training).
    fp32_buffers: ClassVar[tuple[str, ...]] = ("load_bias",)

    @classmethod
    def check(cls, cfg: Config, num_moe_layers: int) -> None:
        """Rules of this router beyond the shared ones; raise ConfigError naming the flags."""

    @classmethod
    def learned_parameters(cls, hidden_size: int, num_experts: int) -> int:
        """Trainable parameters of one layer's router."""
        return 0

    @classmethod
    def flops_per_token(cls, hidden_size: int, num_experts: int) -> float:
        """Forward matmul FLOPs per token of one layer's router."""
        return 0.0

    def hf_export_state(self) -> dict:
        """Per-layer facts the Hugging Face remote-code model needs besides the state dict."""
        return {}

    def __init__(self, cfg: MoEConfig, hidden_size: int, layer_number: int, moe_index: int,
                 seed: int = 0, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.topk = cfg.moe_router_topk
        self.pre_softmax = cfg.moe_router_pre_softmax
        self.capacity_factor = cfg.moe_expert_capacity_factor
        self.drop_policy = cfg.moe_token_drop_policy
        self.aux_loss_coeff = cfg.moe_aux_loss_coeff
        self.z_loss_coeff = cfg.moe_z_loss_coeff
        # Tensor parallelism: this router sees 1/T of the tokens; its losses are those of all T
        # slices (MoELayer.set_tensor_parallel).
        self.tp_group = None
        self.score_function = cfg.moe_router_score_function
        self.hidden_size = hidden_size
        self.layer_number = layer_number
        self.moe_index = moe_index
        self.seed = seed
        # Aux-loss-free balancing: named without "expert" (DeepSpeed's MoE checkpoint code sends
        # every such key of an MoE module to its per-expert files).
        if cfg.moe_router_enable_expert_bias:
            self.register_buffer("load_bias", torch.zeros(self.num_experts), persistent=True)
        else:
            self.load_bias = None

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to `fp32_buffers`, dtype casts do not (they stay exact fp32)."""
        keep = {n: getattr(self, n, None) for n in self.fp32_buffers}
        super()._apply(fn, recurse)
        for n, t in keep.items():
            if t is not None:
                setattr(self, n, t.to(device=getattr(self, n).device))
        return self

    @torch.no_grad()
    def update_load_bias(self, tokens_per_expert_E: Tensor, rate: float) -> None:
        """bias_e += rate x sign(mean load - load_e) from one step's counts (summed over its
        micro-batches and data-parallel ranks; the same on every rank)."""
        load = tokens_per_expert_E.to(device=self.load_bias.device, dtype=torch.float32)
        self.load_bias.add_(torch.sign(load.mean() - load), alpha=rate)

    def logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        """fp32 logits [T, E]: the only hook a router type overrides (`ctx` holds [T] tensors)."""
        raise NotImplementedError

    def forward(self, x_TD: Tensor, ctx: Optional[RoutingContext] = None) -> RouterOutput:
        logits_TE = self.logits(x_TD, ctx or RoutingContext())
        return self.route(logits_TE)

    def route(self, logits_TE: Tensor) -> RouterOutput:
        """Top-k selection, weights, capacity and losses from fp32 logits."""
        probs_TK, ids_TK = self.select(logits_TE)
        return self.finish(probs_TK, ids_TK, logits_TE)

    def select(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, ids) [T, K] of the top-k experts per the score function; the expert bias,
        if any, moves the selection and never the weights."""
        bias, k = self.load_bias, self.topk
        if self.score_function == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            ids_TK = torch.topk(scores_TE if bias is None else scores_TE + bias, k, dim=-1)[1]
            picked_TK = scores_TE.gather(1, ids_TK)
            return picked_TK / (picked_TK.sum(-1, keepdim=True) + 1e-20), ids_TK
        if self.pre_softmax:
            scores_TE = torch.softmax(logits_TE, dim=-1)
            if bias is None:
                return torch.topk(scores_TE, k, dim=-1)
            ids_TK = torch.topk(scores_TE + bias, k, dim=-1)[1]
            return scores_TE.gather(1, ids_TK), ids_TK
        if bias is None:
            top_logits_TK, ids_TK = torch.topk(logits_TE, k, dim=-1)
        else:
            ids_TK = torch.topk(logits_TE + bias, k, dim=-1)[1]
            top_logits_TK = logits_TE.gather(1, ids_TK)
        return torch.softmax(top_logits_TK, dim=-1), ids_TK

    def finish(self, probs_TK: Tensor, ids_TK: Tensor, logits_TE: Optional[Tensor]
               ) -> RouterOutput:
        """Counts, capacity and (with logits) the aux and z losses of a selection."""
        num_tokens, num_experts = ids_TK.shape[0], self.num_experts
        tokens_per_expert_E = count_per_expert(ids_TK, num_experts)
        keep_TK = None
        dropped = torch.zeros((), dtype=torch.int64, device=ids_TK.device)
        if self.capacity_factor is not None:
            keep_TK = self._capacity_mask(probs_TK, ids_TK, tokens_per_expert_E)
            probs_TK = probs_TK * keep_TK
            dropped = (~keep_TK).sum()
        zero = probs_TK.new_zeros((), dtype=torch.float32)
        if self.tp_group is not None:
            return RouterOutput(probs_TK, ids_TK, keep_TK, tokens_per_expert_E, dropped,
                                *self._tp_losses(logits_TE, tokens_per_expert_E, zero))
        aux = zero
        if self.aux_loss_coeff > 0:
            full_probs_TE = self._aux_probs(logits_TE)
            frac_E = tokens_per_expert_E.to(logits_TE.dtype) / (num_tokens * self.topk)
            aux = self.aux_loss_coeff * num_experts * (frac_E * full_probs_TE.mean(0)).sum()
        z = zero
        if self.z_loss_coeff > 0:
            z = self.z_loss_coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
        return RouterOutput(probs_TK, ids_TK, keep_TK, tokens_per_expert_E, dropped, aux, z)

    def _aux_probs(self, logits_TE: Tensor) -> Tensor:
        """Every expert's probability per token, as the aux loss reads it (normalised sigmoid
        scores, or the softmax)."""
        if self.score_function == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            return scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        return torch.softmax(logits_TE, dim=-1)

    def _tp_losses(self, logits_TE: Optional[Tensor], counts_E: Tensor, zero: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """The aux and z losses over every token of the tensor group: counts and the sums of
        probabilities and of squared log-sum-exps all-reduced (the sums differentiably, as a
        replicated value's partial sums), divided by the group's token count."""
        group = self.tp_group
        n_all = logits_TE.shape[0] * dist.get_world_size(group) if logits_TE is not None else 0
        aux = z = zero
        if self.aux_loss_coeff > 0:
            full_probs_TE = self._aux_probs(logits_TE)
            counts = counts_E.clone()
            dist.all_reduce(counts, group=group)
            frac_E = counts.to(logits_TE.dtype) / (n_all * self.topk)
            mean_probs_E = reduce_from_tp(full_probs_TE.sum(0), group) / n_all
            aux = self.aux_loss_coeff * self.num_experts * (frac_E * mean_probs_E).sum()
        if self.z_loss_coeff > 0:
            sq = torch.logsumexp(logits_TE, dim=-1).square().sum()
            z = self.z_loss_coeff * reduce_from_tp(sq, group) / n_all
        return aux, z

    def capacity(self, num_tokens: int) -> int:
        """Routes each expert may take from this batch: ceil(T k / E x factor)."""
        return math.ceil(num_tokens * self.topk / self.num_experts * self.capacity_factor)

    def _capacity_mask(self, probs_TK: Tensor, ids_TK: Tensor, counts_E: Tensor) -> Tensor:
        """Keep, per expert, the `capacity` routes with the highest prob (or earliest token)."""
        num_tokens, k = ids_TK.shape
        cap = self.capacity(num_tokens)
        flat_ids = ids_TK.reshape(-1)
        if self.drop_policy == "probs":
            priority = probs_TK.detach().reshape(-1)
        else:  # position: earlier tokens first; among a token's routes, the higher-ranked first
            priority = -torch.arange(flat_ids.numel(), device=ids_TK.device, dtype=torch.float64)
        # Sort routes by (expert, priority desc); rank within each expert's block.
        order = torch.argsort(priority, descending=True, stable=True)
        order = order[torch.argsort(flat_ids[order], stable=True)]
        starts = torch.cumsum(counts_E, 0) - counts_E
        rank_sorted = torch.arange(flat_ids.numel(), device=ids_TK.device) - starts[flat_ids[order]]
        keep = torch.empty_like(flat_ids, dtype=torch.bool)
        keep[order] = rank_sorted < cap
        return keep.view(num_tokens, k)


_REGISTRY: dict[str, type[Router]] = {}
ROUTERS = _REGISTRY
"""--router-type name -> Router subclass (filled by `register_router`)."""


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make `cls` the router of `--router-type name`."""
    def register(cls: type[Router]) -> type[Router]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"router type {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return register


@register_router("self")
class SelfRouter(Router):
    """Zero-parameter router: logits are N designated coordinates of the hidden state."""

    options = ("self_route_dims",)
    checkpoint_fields = ("self_route_dims",)
    hf_kind = "self"

    @classmethod
    def check(cls, cfg: Config, num_moe_layers: int) -> None:
        n, h = cfg.moe.num_experts, cfg.model.hidden_size
        if n > h:
            raise ConfigError(f"--router-type self needs --num-experts {n} <= --hidden-size "
                              f"{h} (logits are hidden coordinates)")
        if cfg.moe.self_route_dims == "per-layer" and n * num_moe_layers > h:
            raise ConfigError(
                f"--self-route-dims per-layer needs --num-experts {n} x {num_moe_layers} MoE "
                f"layers = {n * num_moe_layers} <= --hidden-size {h}")

    def hf_export_state(self) -> dict:
        return {"self_route_start": self.dims.start}

    def __init__(self, cfg: MoEConfig, hidden_size: int, layer_number: int, moe_index: int,
                 seed: int = 0, init_std: float = 0.02) -> None:
        super().__init__(cfg, hidden_size, layer_number, moe_index, seed, init_std)
        n, h = self.num_experts, hidden_size
        if cfg.self_route_dims == "last":
            start = h - n
        elif cfg.self_route_dims == "first":
            start = 0
        else:  # per-layer: the i-th MoE layer reads [H - N (i+1), H - N i)
            start = h - n * (moe_index + 1)
        if start < 0:
            raise ValueError(f"self-routing coordinates [{start}, {start + n}) overflow hidden "
                             f"size {h}")
        self.dims = slice(start, start + n)

    def logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        return x_TD[..., self.dims].float()


@register_router("learned")
class LearnedRouter(Router):
    """Learned linear router W in R^{D x E} (no bias), computed in fp32."""

    hf_kind = "learned"

    @classmethod
    def learned_parameters(cls, hidden_size: int, num_experts: int) -> int:
        return hidden_size * num_experts

    @classmethod
    def flops_per_token(cls, hidden_size: int, num_experts: int) -> float:
        return 2.0 * hidden_size * num_experts

    def __init__(self, cfg: MoEConfig, hidden_size: int, layer_number: int, moe_index: int,
                 seed: int = 0, init_std: float = 0.02) -> None:
        super().__init__(cfg, hidden_size, layer_number, moe_index, seed, init_std)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        return F.linear(x_TD.float(), self.weight.float())


@register_router("fixed-random")
class FixedRandomRouter(Router):
    """Frozen random projection R (same distribution as the learned router's initial weight).

    R is a persistent fp32 buffer drawn from a generator seeded by (seed, layer) — or (seed) with
    `fixed_random_shared` — so it is identical on every rank, never trained, and carried by every
    checkpoint (the checkpoint's copy is authoritative over regeneration).
    """

    options = ("fixed_random_shared", "fixed_random_init")
    checkpoint_fields = ("fixed_random_shared", "fixed_random_init")
    hf_kind = "fixed-random"
    fp32_buffers = ("load_bias", "proj")

    @classmethod
    def check(cls, cfg: Config, num_moe_layers: int) -> None:
        n, h = cfg.moe.num_experts, cfg.model.hidden_size
        if cfg.moe.fixed_random_init == "orthogonal" and n > h:
            raise ConfigError(f"--fixed-random-init orthogonal needs --num-experts {n} <= "
                              f"--hidden-size {h} (orthogonal rows)")

    @classmethod
    def flops_per_token(cls, hidden_size: int, num_experts: int) -> float:
        return 2.0 * hidden_size * num_experts

    def __init__(self, cfg: MoEConfig, hidden_size: int, layer_number: int, moe_index: int,
                 seed: int = 0, init_std: float = 0.02) -> None:
        super().__init__(cfg, hidden_size, layer_number, moe_index, seed, init_std)
        gen = torch.Generator().manual_seed(
            mix_seed(seed, 0x5EED, -1 if cfg.fixed_random_shared else layer_number)
        )
        if cfg.fixed_random_init == "orthogonal":
            proj = orthogonal_rows(self.num_experts, hidden_size, init_std * math.sqrt(hidden_size),
                                   gen)
        else:
            proj = torch.randn(self.num_experts, hidden_size, generator=gen) * init_std
        self.register_buffer("proj", proj, persistent=True)

    def logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        return F.linear(x_TD.float(), self.proj)


def orthogonal_rows(rows: int, cols: int, norm: float, gen: torch.Generator) -> Tensor:
    """[rows, cols] fp32 with orthogonal rows of length `norm` (rows <= cols): the first rows of
    a Haar-random rotation (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(cols, rows, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return (q.T * norm).to(torch.float32).contiguous()


@register_router("random")
class RandomRouter(Router):
    """Content-independent random logits: a pure function of (seed, layer, iteration, token).

    Each logit is a standard Gaussian made by Box-Muller from a counter-based hash of
    (seed, layer, iteration, global token index, expert): no generator state, so results do not
    depend on the parallel layout, activation recompute replays them, and resume is exact.
    """

    trainable_scores = False
    hf_refusal = ("cannot be exported to Hugging Face (its logits hash the token's position in "
                  "the batch, not the text); evaluate the consolidated checkpoint with "
                  "tools/eval_lm.py instead")

    def logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        num_tokens, n = x_TD.shape[0], self.num_experts
        token_index_T = ctx.token_index
        if token_index_T is None:
            token_index_T = torch.arange(num_tokens, device=x_TD.device)
        key = mix_seed(self.seed, 0xA11CE, self.layer_number, ctx.iteration)
        base = token_index_T.to(torch.int64).view(-1, 1) * (2 * n)
        cols = torch.arange(n, device=x_TD.device, dtype=torch.int64).view(1, -1)
        u1 = hash_uniform(key, base + 2 * cols)
        u2 = hash_uniform(key, base + 2 * cols + 1)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.float()


def random_hash_table(vocab: int, num_experts: int, k: int, gen: torch.Generator) -> Tensor:
    """[vocab, k] int64: for each token id, the first k of a uniformly random order of the
    experts (k distinct experts per id)."""
    return torch.rand(vocab, num_experts, generator=gen).argsort(dim=1)[:, :k].contiguous()


def balanced_hash_table(freq_V: Tensor, num_experts: int, k: int) -> Tensor:
    """[V, k] int64 balanced assignment: token ids in order of decreasing frequency (ties: lower
    id first) each take the k experts with the least load so far (ties: fewer ids, then lower
    expert index); an expert's load is the summed frequency of its ids. Greedy, like LPT
    scheduling, so max load - min load <= the largest single-id frequency (k < E). Ids never
    seen (frequency 0) come last and take the experts with the fewest ids (ties: least load,
    then lower index), so they are spread evenly by count."""
    freq = [float(f) for f in freq_V.tolist()]
    order = sorted(range(len(freq)), key=lambda v: (-freq[v], v))
    load, nids = [0.0] * num_experts, [0] * num_experts
    table = [[0] * k for _ in freq]
    experts = range(num_experts)
    for v in order:
        if freq[v] > 0:
            chosen = sorted(experts, key=lambda e: (load[e], nids[e], e))[:k]
        else:
            chosen = sorted(experts, key=lambda e: (nids[e], load[e], e))[:k]
        for j, e in enumerate(chosen):
            table[v][j] = e
            load[e] += freq[v]
            nids[e] += 1
    return torch.tensor(table, dtype=torch.int64).view(len(freq), k)


@register_router("hash")
class HashRouter(Router):
    """Hash layers (Roller et al. 2021): a fixed table from token id to k distinct experts,
    each weighted 1/k; no gate, no learned parameters, content-independent but the same experts
    for every occurrence of a token id.

    The table is a persistent int64 buffer [padded vocabulary, k] (saved with the model and
    exported). `--hash-assignment random` draws it from (seed, layer) — (seed) with
    `--hash-shared` — at construction; `balanced` replaces it before training with
    `balanced_hash_table` of the training split's token frequencies (`set_table`; with per-layer
    tables each layer relabels its experts by a seeded permutation, which keeps the balance).
    A checkpoint's table is authoritative over both.
    """

    options = ("hash_assignment", "hash_shared")
    checkpoint_fields = ("hash_assignment", "hash_shared")
    trainable_scores = False
    reads_token_ids = True
    hf_kind = "hash"

    @classmethod
    def check(cls, cfg: Config, num_moe_layers: int) -> None:
        moe = cfg.moe
        rules = ((moe.moe_router_pre_softmax, "--moe-router-pre-softmax"),
                 (moe.moe_router_score_function != "softmax",
                  f"--moe-router-score-function {moe.moe_router_score_function}"),
                 (moe.moe_router_enable_expert_bias, "--moe-router-enable-expert-bias"),
                 (moe.moe_aux_loss_coeff > 0, f"--moe-aux-loss-coeff {moe.moe_aux_loss_coeff}"),
                 (moe.moe_z_loss_coeff > 0, f"--moe-z-loss-coeff {moe.moe_z_loss_coeff}"))
        for bad, flag in rules:
            if bad:
                raise ConfigError(f"{flag} does not apply to --router-type hash (it has no "
                                  "scores: a fixed table, weights 1/k)")

    def __init__(self, cfg: MoEConfig, hidden_size: int, layer_number: int, moe_index: int,
                 seed: int = 0, init_std: float = 0.02, vocab_size: Optional[int] = None
                 ) -> None:
        super().__init__(cfg, hidden_size, layer_number, moe_index, seed, init_std)
        if vocab_size is None:
            raise ValueError("--router-type hash needs the vocabulary size")
        self.shared = cfg.hash_shared
        self.assignment = cfg.hash_assignment
        gen = torch.Generator().manual_seed(self._table_seed())
        self.register_buffer(
            "table", random_hash_table(vocab_size, self.num_experts, self.topk, gen),
            persistent=True)

    def _table_seed(self) -> int:
        return mix_seed(self.seed, 0x4A54, -1 if self.shared else self.layer_number)

    @torch.no_grad()
    def set_table(self, table_VK: Tensor, relabel: bool = True) -> None:
        """Use `table_VK` (e.g. `balanced_hash_table`); with per-layer tables and `relabel`,
        experts are renamed by this layer's seeded permutation."""
        if table_VK.shape != self.table.shape:
            raise ValueError(f"hash table of shape {tuple(table_VK.shape)}, expected "
                             f"{tuple(self.table.shape)}")
        if relabel and not self.shared:
            gen = torch.Generator().manual_seed(self._table_seed())
            table_VK = torch.randperm(self.num_experts, generator=gen)[table_VK]
        self.table.copy_(table_VK)

    def forward(self, x_TD: Tensor, ctx: Optional[RoutingContext] = None) -> RouterOutput:
        token_ids = None if ctx is None else ctx.token_ids
        if token_ids is None:
            raise RuntimeError("--router-type hash needs the token ids (language models only)")
        ids_TK = self.table.index_select(0, token_ids.reshape(-1).to(self.table.device))
        probs_TK = torch.full(ids_TK.shape, 1.0 / self.topk, dtype=torch.float32,
                              device=x_TD.device)
        return self.finish(probs_TK, ids_TK.to(x_TD.device), None)


def validate_router(cfg: Config, num_moe_layers: int) -> None:
    """The router rules of `cfg`: a registered type, no other router's options, the shared
    top-1 rule, then the router's own `check`."""
    moe = cfg.moe
    cls = ROUTERS.get(moe.router_type)
    if cls is None:
        raise ConfigError(f"--router-type {moe.router_type!r} is unknown; choose one of "
                          f"{', '.join(ROUTERS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    for other in ROUTERS.values():
        for opt in other.options:
            value = getattr(moe, opt)
            if opt not in cls.options and value != defaults[opt]:
                shown = "" if isinstance(value, bool) else f" {value}"
                raise ConfigError(f"{_flag(opt)}{shown} applies only to --router-type "
                                  f"{other.name}, not {cls.name}")
    sigmoid = moe.moe_router_score_function == "sigmoid"
    if sigmoid and moe.moe_router_pre_softmax:
        raise ConfigError("--moe-router-pre-softmax and --moe-router-score-function sigmoid "
                          "are mutually exclusive")
    if moe.moe_router_topk == 1 and cls.trainable_scores:
        if sigmoid:
            raise ConfigError(
                f"--moe-router-score-function sigmoid with --moe-router-topk 1 and "
                f"--router-type {moe.router_type}: a weight normalised over one selected "
                "expert is always 1 (no router gradient); use top-k >= 2 or softmax with "
                "--moe-router-pre-softmax")
        if not moe.moe_router_pre_softmax:
            raise ConfigError(
                f"--moe-router-topk 1 with --router-type {moe.router_type} needs "
                "--moe-router-pre-softmax (softmax over one selected logit is always 1: no "
                "router gradient)")
    rate = moe.moe_router_bias_update_rate
    if rate != defaults["moe_router_bias_update_rate"] and not moe.moe_router_enable_expert_bias:
        raise ConfigError(f"--moe-router-bias-update-rate {rate} needs "
                          "--moe-router-enable-expert-bias")
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"--moe-router-bias-update-rate must be > 0, got {rate}")
    cls.check(cfg, num_moe_layers)


def build_router(cfg: MoEConfig, hidden_size: int, layer_number: int, moe_index: int,
                 seed: int, init_std: float, vocab_size: Optional[int] = None) -> Router:
    """Instantiate the router named by `cfg.router_type` from the registry."""
    cls = ROUTERS[cfg.router_type]
    if cls.reads_token_ids:
        return cls(cfg, hidden_size, layer_number, moe_index, seed, init_std,
                   vocab_size=vocab_size)
    return cls(cfg, hidden_size, layer_number, moe_index, seed, init_std)


BUILTIN_ROUTERS: tuple[str, ...] = tuple(ROUTERS)
"""The router types this package defines (the registry may grow: tests and plug-ins register
more)."""
