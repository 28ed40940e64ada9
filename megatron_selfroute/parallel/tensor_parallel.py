"""Megatron tensor parallelism for the GPT blocks: the four region ops, sharded layers, and the
transformation that shards a model built for one device (`shard_for_tensor_parallel`).

Regions (Megatron's f/g operators, Shoeybi et al. 2019). Between blocks the activations are
replicated on the T ranks of a tensor-parallel group and so are their gradients:

- `copy_to_tp`: identity forward, all-reduce of the gradient backward (the input of a
  column-parallel layer: each rank's slice contributes part of the input's gradient);
- `reduce_from_tp`: all-reduce forward, identity backward (the output of a row-parallel layer,
  or any partial sum that becomes a replicated value);
- `split_to_tp`: this rank's 1/T of the rows forward, all-gather backward (the tokens an MoE
  layer routes: each TP rank routes, dispatches and computes a different 1/T of them);
- `gather_from_tp`: all-gather forward, this rank's rows backward (their outputs made whole).

Layers keep the module names and parameter names of the one-device model (`attn.c_attn.weight`,
...), with this rank's shard as the tensor: checkpoints are saved per TP rank under the same keys,
as in Megatron. Every sharded parameter carries `tensor_model_parallel = True` (DeepSpeed's ZeRO
norm and this project's ZeRO-0 clipping count a shard on every rank, a replicated parameter once),
`partition_dim` and `partition_stride`, and `tp_shard`, a function from the full tensor to this
rank's shard: initialisation draws the full tensor from (seed, name) and keeps the shard, so
every TP degree starts from the one-device model, and converters use the same function.

Shards: QKV (`c_attn`, rows [q; k; v] of H heads) keeps heads [t H/T, (t+1) H/T) of each of q, k and
v; the first MLP projection (`c_fc`) keeps rows [t F/T, (t+1) F/T); the output projections
(`c_proj`) keep the matching input columns and a replicated bias added after the all-reduce;
the token embedding and the output layer keep vocabulary rows [t V/T, (t+1) V/T) of the padded
vocabulary (50,304 for GPT-2, for every T that divides it), so the shapes of a checkpoint's full
tensors never depend on T.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_selfroute.seeding import mix_seed

# ---- region ops -------------------------------------------------------------------------------


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, group, dim: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_rows(x: Tensor, group) -> Tensor:
    return _all_gather(x, group, 0)


def own_rows(x: Tensor, group) -> Tensor:
    n, t = dist.get_world_size(group), dist.get_rank(group)
    step = x.shape[0] // n
    return x[t * step:(t + 1) * step].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SplitToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return own_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        return gather_rows(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        return own_rows(g, ctx.group), None


def copy_to_tp(x: Tensor, group) -> Tensor:
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return x if group is None else _ReduceFromTP.apply(x, group)


def split_to_tp(x: Tensor, group) -> Tensor:
    """This rank's contiguous 1/T of the rows of `x` (dim 0 must divide by T)."""
    return x if group is None else _SplitToTP.apply(x, group)


def gather_from_tp(x: Tensor, group) -> Tensor:
    return x if group is None else _GatherFromTP.apply(x, group)


def gather_last_dim(x: Tensor, group) -> Tensor:
    """All-gather along the last dimension (evaluation logits only; no backward)."""
    return x if group is None else _all_gather(x, group, -1)


# ---- sharded layers ---------------------------------------------------------------------------


def _tag(p: nn.Parameter, dim: int, shard: Callable[[Tensor], Tensor], full_shape) -> None:
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1
    p.tp_shard = shard
    p.tp_full_shape = tuple(full_shape)


def sharded_param(full: Optional[Tensor], shard: Callable[[Tensor], Tensor], dim: int
           ) -> Optional[nn.Parameter]:
    if full is None:
        return None
    p = nn.Parameter(shard(full.detach()).clone())
    _tag(p, dim, shard, full.shape)
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's output features (the input replicated)."""

    def __init__(self, full: nn.Linear, shard_rows: Callable[[Tensor], Tensor], group) -> None:
        super().__init__()
        self.group = group
        self.in_features = full.in_features
        self.weight = sharded_param(full.weight, shard_rows, 0)
        self.bias = sharded_param(full.bias, shard_rows, 0)
        self.out_features = self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all-reduce(x_local W_local^T) + b: this rank's input features; the bias is
    replicated (not tagged: counted once) and added after the sum."""

    def __init__(self, full: nn.Linear, shard_cols: Callable[[Tensor], Tensor], group) -> None:
        super().__init__()
        self.group = group
        self.out_features = full.out_features
        self.weight = sharded_param(full.weight, shard_cols, 1)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())
        self.in_features = self.weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/T) of the embedding; other ids give zeros, summed over the group."""

    def __init__(self, full: nn.Embedding, group, tp: int, tp_rank: int) -> None:
        super().__init__()
        self.group = group
        rows = full.num_embeddings // tp
        self.start, self.end = tp_rank * rows, (tp_rank + 1) * rows
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.weight = sharded_param(full.weight, lambda w: w[self.start:self.end], 0)

    def forward(self, ids: Tensor) -> Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, 0, ids - self.start)
        x = F.embedding(local, self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(x, self.group)


def qkv_shard(tp: int, rank: int) -> Callable[[Tensor], Tensor]:
    """Rows [q; k; v] (each D rows, heads in order) -> this rank's heads of each, concatenated."""
    def shard(w: Tensor) -> Tensor:
        q, k, v = w.chunk(3, dim=0)
        return torch.cat([t.chunk(tp, dim=0)[rank] for t in (q, k, v)], dim=0)
    return shard


def rows_shard(tp: int, rank: int) -> Callable[[Tensor], Tensor]:
    return lambda w: w.chunk(tp, dim=0)[rank]


def cols_shard(tp: int, rank: int) -> Callable[[Tensor], Tensor]:
    return lambda w: w.chunk(tp, dim=1)[rank]


def shard_mlp(mlp: nn.Module, group, tp: int, rank: int) -> None:
    """A dense MLP (c_fc, c_proj) sharded in place: column-parallel c_fc, row-parallel c_proj."""
    mlp.c_fc = ColumnParallelLinear(mlp.c_fc, rows_shard(tp, rank), group)
    mlp.c_proj = RowParallelLinear(mlp.c_proj, cols_shard(tp, rank), group)


def shard_attention(attn: nn.Module, group, tp: int, rank: int,
                    rng: Optional["TensorParallelRNG"] = None) -> None:
    attn.c_attn = ColumnParallelLinear(attn.c_attn, qkv_shard(tp, rank), group)
    attn.c_proj = RowParallelLinear(attn.c_proj, cols_shard(tp, rank), group)
    attn.num_heads //= tp
    attn.tp_rng = rng  # this rank's heads draw their dropout masks from the model's stream


def shard_full_tensor(p: Tensor, full: Tensor) -> Tensor:
    """`full` (a one-device tensor of `p`'s name) as `p`'s shard (identity when not sharded)."""
    shard = getattr(p, "tp_shard", None)
    return full if shard is None else shard(full)


def full_shape(p: Tensor) -> tuple:
    return getattr(p, "tp_full_shape", tuple(p.shape))


def shard_positions(p: Tensor) -> Tensor:
    """The flat positions in the full tensor of sharded `p`'s elements (shaped like `p`):
    `place_shard` puts a piece of this rank back with them."""
    shape = full_shape(p)
    n = int(torch.Size(shape).numel())
    index = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64)
    return p.tp_shard(index.view(shape))


def place_shard(full: Tensor, where: Tensor, piece: Tensor) -> None:
    """Write `piece` into `full` at `where` (from `shard_positions`)."""
    full.view(-1)[where.reshape(-1)] = piece.reshape(-1)


def is_tp_sharded(p: Tensor) -> bool:
    """A shard of a tensor split over the tensor group (not a replicated tensor)."""
    return getattr(p, "tp_shard", None) is not None


# ---- applying it to a model built for one device ----------------------------------------------


def apply_tensor_parallel(model: nn.Module, layout) -> nn.Module:
    """Shard every block of `model` over `layout`'s tensor group in place (before its weights
    are initialised or loaded): attention and dense MLPs (shared experts included) column- then
    row-parallel, MoE layers routing 1/T of the tokens each; a GPT's token embedding and output
    layer vocabulary-parallel. Identity at TP = 1."""
    from megatron_selfroute.models.transformer import MLP, Block

    if layout.tp == 1:
        return model
    group, tp, rank = layout.tp_group, layout.tp, layout.tp_rank
    model.tp_rng = TensorParallelRNG(model.cfg.train.seed, rank)  # one stream per model
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        shard_attention(block.attn, group, tp, rank, model.tp_rng)
        if isinstance(block.mlp, MLP):
            shard_mlp(block.mlp, group, tp, rank)
        else:
            block.mlp.set_tensor_parallel(group)
        if block.shared_mlp is not None:
            shard_mlp(block.shared_mlp, group, tp, rank)
    if hasattr(model, "set_tensor_parallel"):
        model.set_tensor_parallel(group, tp, rank)
    return model


def tp_sum_hook(group):
    """A gradient hook summing a replicated parameter's gradient over the tensor group (for
    weights that see 1/T of the tokens, e.g. a router's)."""
    def hook(grad: Tensor) -> Tensor:
        return _all_reduce(grad.clone(), group)
    return hook


# ---- the tensor-parallel RNG stream (Megatron's model-parallel RNG tracker) -----------------

class TensorParallelRNG:
    """The generator attention dropout draws from under tensor parallelism.

    The default generators are seeded alike on every rank, so an element of a replicated
    activation (the residual stream, hidden dropout) is dropped on all TP ranks or on none, as it
    must be. The attention probabilities of this rank's heads exist on this rank only: drawn from
    the default stream, head h of every TP rank would get the same mask. As Megatron-LM's
    `model-parallel-rng` does, they come from a stream of their own, seeded from (seed, 2718,
    tp_rank): `fork(device)` swaps it in for the duration of the call and keeps where it got to.
    The model holds it (`model.tp_rng`, shared by its attention modules); recompute replays the
    same masks (`checkpoint_contexts`), and checkpoints save and restore it
    (`checkpoint/rng.py`).
    """

    def __init__(self, seed: int, tp_rank: int) -> None:
        self.seed = mix_seed(seed, 2718, tp_rank)
        self.states: dict[str, Tensor] = {}  # device type -> generator state

    @staticmethod
    def _get(device: torch.device) -> Tensor:
        return (torch.cuda.get_rng_state(device) if device.type == "cuda"
                else torch.get_rng_state())

    @staticmethod
    def _set(device: torch.device, state: Tensor) -> None:
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self, device: torch.device):
        """Draw from this rank's stream inside the block; the default generator of `device`
        is left exactly as it was."""
        outer = self._get(device)
        state = self.states.get(device.type)
        if state is None:  # first use on this device type: a fresh generator of the seed
            state = torch.Generator(device=device).manual_seed(self.seed).get_state()
        self._set(device, state)
        try:
            yield
        finally:
            self.states[device.type] = self._get(device)
            self._set(device, outer)

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def load(self, states: dict[str, Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


class _ReplayStream:
    """Recompute context: the stream as the forward found it, then back to where it is."""

    def __init__(self, rng: TensorParallelRNG, box: dict) -> None:
        self.rng, self.box, self.now = rng, box, None

    def __enter__(self):
        self.now = self.rng.snapshot()
        self.rng.load(self.box["states"])

    def __exit__(self, *exc):
        self.rng.load(self.now)
        return False


class _RecordStream:
    """Forward context: remembers where the stream was when the region began."""

    def __init__(self, rng: TensorParallelRNG, box: dict) -> None:
        self.rng, self.box = rng, box

    def __enter__(self):
        self.box["states"] = self.rng.snapshot()

    def __exit__(self, *exc):
        return False


def checkpoint_contexts(rng: TensorParallelRNG):
    """`context_fn` of torch.utils.checkpoint (with `functools.partial(..., rng)`): the
    recompute draws the tensor-parallel stream from where the forward drew it (torch restores
    the default generators itself). Reusable: a graph kept for a second backward replays
    again."""
    box: dict = {}
    return _RecordStream(rng, box), _ReplayStream(rng, box)
