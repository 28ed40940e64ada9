"""Token dispatchers: move routed tokens to their experts and the results back.

One interface, `TokenDispatcher.forward(x_TD, routing, experts) -> y_TD`, in three phases:
dispatch (local permutation, then communication over the expert-parallel group) -> experts ->
combine (the reverse exchange, unpermute, weighted sum). The routing decision (`RouterOutput`) is
an argument; a dispatcher keeps no state between calls. Two implementations:

- `AllToAllDispatcher` (default, `--moe-token-dispatcher-type alltoall`): padding-free and
  dropless-capable. Routes are permuted locally so each expert's rows are contiguous, the
  per-expert counts are exchanged, rows travel with one uneven all-to-all, local experts run on
  their row blocks (`Experts.compute`), and the reverse all-to-all + unpermute + weighted sum
  brings them home. Cost is proportional to the routed tokens, whatever the imbalance.
- `DeepSpeedDispatcher` (`--moe-token-dispatcher-type deepspeed`, the reference path): DeepSpeed's
  own `MOELayer` runs all three phases with its padded capacity buffers (the most-loaded expert
  when dropless, so its cost grows with imbalance), fed this project's routing through
  `DeepSpeedGateAdapter`, which turns it into DeepSpeed's 7-tuple.

The expert-parallel group arrives through `wire` (called by `MoELayer.parallelize`). Autograd
runs through every step of both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_selfroute.moe.experts import Experts
from megatron_selfroute.moe.router import RouterOutput, count_per_expert


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, group, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        ctx.group, ctx.send_splits, ctx.recv_splits = group, send_splits, recv_splits
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits,
                               group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, group, send_splits: list[int], recv_splits: list[int]) -> Tensor:
    """Differentiable uneven all-to-all of rows of `x`."""
    return _AllToAll.apply(x, group, send_splits, recv_splits)


@dataclass
class DispatchState:
    """What combine() needs to undo dispatch()."""

    token_of_route_R: Tensor  # source token of each kept route, in expert-sorted order
    probs_R: Tensor  # fp32 weight of each kept route, same order
    num_tokens: int
    send_splits: Optional[list[int]] = None
    recv_splits: Optional[list[int]] = None
    regroup: Optional[Tensor] = None  # received (rank, expert) order -> (expert, rank) order


class TokenDispatcher:
    """dispatch -> experts -> combine for one MoE layer over its expert-parallel group."""

    def __init__(self, num_experts: int, expert_compute: str = "auto") -> None:
        self.num_experts = num_experts
        self.expert_compute = expert_compute  # --moe-grouped-gemm
        self.ep_group = None
        self.ep_size = 1
        self.num_local_experts = num_experts

    def wire(self, experts: Experts, ep_group, ep_size: int) -> None:
        """Adopt the layer's (materialised) experts and its expert-parallel group."""
        self.ep_group, self.ep_size = ep_group, ep_size
        self.num_local_experts = self.num_experts // ep_size

    def forward(self, x_TD: Tensor, routing: RouterOutput, experts: Experts) -> Tensor:
        """[T, D] tokens -> [T, D] weighted sum of each token's expert outputs."""
        raise NotImplementedError

    __call__ = forward


class AllToAllDispatcher(TokenDispatcher):
    """Padding-free dispatch over an expert-parallel group of size P (P = 1: local only)."""

    def __init__(self, num_experts: int, expert_compute: str = "auto") -> None:
        super().__init__(num_experts, expert_compute)
        self.last_sent_rows = 0  # rows sent to other ranks in the last dispatch (for benchmarks)

    def forward(self, x_TD: Tensor, routing: RouterOutput, experts: Experts) -> Tensor:
        rows_RD, counts, state = self.dispatch(x_TD, routing)
        return self.combine(experts.compute(rows_RD, counts, self.expert_compute), state)

    __call__ = forward

    def dispatch(self, x_TD: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor,
                                                                     DispatchState]:
        """Rows for this rank's local experts, grouped by local expert, and their counts (an
        int64 tensor on the rows' device; with P = 1 and no capacity, nothing here waits for the
        device)."""
        num_tokens, k = routing.ids_TK.shape
        ids_R = routing.ids_TK.reshape(-1)
        probs_R = routing.probs_TK.reshape(-1)
        token_R = torch.arange(num_tokens * k, device=x_TD.device) // k  # route -> its token
        if routing.keep_TK is not None:
            kept = routing.keep_TK.reshape(-1)
            ids_R, probs_R, token_R = ids_R[kept], probs_R[kept], token_R[kept]
        order = torch.argsort(ids_R, stable=True)
        token_R, probs_R = token_R[order], probs_R[order]
        counts_E = (routing.tokens_per_expert_E if routing.keep_TK is None
                    else count_per_expert(ids_R, self.num_experts))  # kept routes only
        x_RD = x_TD.index_select(0, token_R)  # rows contiguous per global expert
        state = DispatchState(token_R, probs_R, num_tokens)
        if self.ep_size == 1:
            return x_RD, counts_E, state
        p, n_loc = self.ep_size, self.num_local_experts
        # Exchange counts: recv_PL[r, e] = rows rank r sends to my local expert e.
        recv_PL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PL, counts_E, group=self.ep_group)
        recv_PL = recv_PL.view(p, n_loc)
        send_splits = counts_E.view(p, n_loc).sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        my_rank = dist.get_rank(self.ep_group)
        self.last_sent_rows = sum(send_splits) - send_splits[my_rank]
        x_RD = all_to_all(x_RD, self.ep_group, send_splits, recv_splits)
        # Received rows are ordered (source rank, local expert); regroup to (local expert, rank).
        block_sizes = recv_PL.reshape(-1)
        block_ids = torch.arange(p * n_loc, device=x_TD.device).repeat_interleave(block_sizes)
        expert_major = (block_ids % n_loc) * p + block_ids // n_loc
        regroup = torch.argsort(expert_major, stable=True)
        state.send_splits, state.recv_splits, state.regroup = send_splits, recv_splits, regroup
        return x_RD.index_select(0, regroup), recv_PL.sum(0), state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        """Weighted sum of each token's expert outputs, back in token order ([T, D])."""
        if self.ep_size > 1:
            inverse = torch.empty_like(state.regroup)
            inverse[state.regroup] = torch.arange(state.regroup.numel(), device=y_RD.device)
            y_RD = all_to_all(y_RD.index_select(0, inverse), self.ep_group,
                              state.recv_splits, state.send_splits)
        weighted = y_RD.float() * state.probs_R.unsqueeze(1)
        out = weighted.new_zeros(state.num_tokens, y_RD.shape[1])
        out.index_add_(0, state.token_of_route_R, weighted)
        return out.to(y_RD.dtype)


class DeepSpeedGateAdapter(nn.Module):
    """Gate for DeepSpeed's `MOELayer` that returns the project's routing as DeepSpeed's 7-tuple.

    `MOELayer.forward(x, used_token)` calls `gate(x, used_token, sparse_routes=True, use_tutel)`
    and expects `(l_aux, capacity, num_experts, indices_KT, locations_KT, gates_KT, exp_counts)`.
    `DeepSpeedDispatcher` passes the project's `RouterOutput` as that second argument, so the
    decision travels with the call; DeepSpeed's own top-k gating (Gumbel noise on the second
    expert, random token selection) is never used.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, x: Tensor, routing: Optional[RouterOutput] = None,
                sparse_routes: bool = True, use_tutel: bool = False):
        if not isinstance(routing, RouterOutput):
            raise RuntimeError("DeepSpeedGateAdapter needs the routing decision as its second "
                               "argument")
        ids_TK = routing.ids_TK
        num_tokens, k = ids_TK.shape
        keep_TK = routing.keep_TK if routing.keep_TK is not None else torch.ones_like(
            ids_TK, dtype=torch.bool)
        # Location of each kept route inside its expert's buffer, in token-major order.
        flat_ids = torch.where(keep_TK, ids_TK, self.num_experts).reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = count_per_expert(flat_ids, self.num_experts + 1)
        starts = torch.cumsum(counts, 0) - counts
        loc = torch.empty_like(flat_ids)
        loc[order] = torch.arange(flat_ids.numel(), device=x.device) - starts[flat_ids[order]]
        kept_counts = counts[: self.num_experts]
        capacity = kept_counts.max().reshape(1).clone()
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        capacity = max(int(capacity.item()), 1)
        indices = torch.where(keep_TK, ids_TK, -1).t().contiguous().to(torch.int32)
        locations = (loc.view(num_tokens, k) * keep_TK).t().contiguous().to(torch.int32)
        gates = routing.probs_TK.t().contiguous()
        l_aux = x.new_zeros((), dtype=torch.float32)
        return (l_aux, capacity, self.num_experts, indices, locations, gates,
                routing.tokens_per_expert_E.detach())


class _Detached:
    """Holds a module without registering it (DeepSpeed's `MOELayer` shares the layer's
    experts; registered, they would appear twice in the state dict)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class DeepSpeedDispatcher(TokenDispatcher):
    """DeepSpeed's `MOELayer` (capacity buffers, its all-to-all) over the layer's experts."""

    def __init__(self, num_experts: int, expert_compute: str = "auto") -> None:
        super().__init__(num_experts, expert_compute)
        self._moe: Optional[_Detached] = None

    def wire(self, experts: Experts, ep_group, ep_size: int) -> None:
        from deepspeed.moe.sharded_moe import MOELayer

        super().wire(experts, ep_group, ep_size)
        moe = MOELayer(DeepSpeedGateAdapter(self.num_experts), experts, f"ep_size_{ep_size}",
                       ep_size, self.num_local_experts)
        moe._set_ep_group(ep_group)
        self._moe = _Detached(moe)

    def forward(self, x_TD: Tensor, routing: RouterOutput, experts: Experts) -> Tensor:
        if self._moe is None or self._moe.module.experts is not experts:
            raise RuntimeError("DeepSpeedDispatcher used before MoELayer.parallelize wired it")
        return self._moe.module(x_TD, routing)

    __call__ = forward


DISPATCHERS: dict[str, type[TokenDispatcher]] = {
    "alltoall": AllToAllDispatcher,
    "deepspeed": DeepSpeedDispatcher,
}
