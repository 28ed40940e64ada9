"""The output layer and cross-entropy in chunks of tokens, never holding the full logits.

At the paper's setting (sequence 1024 x micro-batch 16, vocabulary 50,304) the plain path's fp32
logits are 3.3 GB per micro-batch, saved for backward, and as much again for their gradient.
`linear_cross_entropy` computes, chunk by chunk of `chunk` tokens, the logits of the real
vocabulary (padded rows are never predicted), their log-sum-exp and each token's loss, and saves
only the hidden states (saved by the plain path's linear layer too) and one fp32 log-sum-exp per
token. Backward recomputes each chunk's logits, forms softmax - one-hot scaled by the incoming
loss gradients, and accumulates the hidden-state and weight gradients (padded weight rows get an
exact zero, as in the plain path). A plain loop over chunks under autograd would still save every
chunk's logits: this is a custom `autograd.Function`.

Vocabulary parallelism (issue 20) fits the same shape: each rank holds a slice of the weight's
rows; the per-chunk max, sum-exp and target logit become all-reduces over the tensor group, the
rest is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = -100  # F.cross_entropy's default: such labels give loss 0 and no gradient


def _max_sum(x: Tensor, op, group) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """`weight` is this rank's rows [start, start + V/T) of the padded vocabulary; rows at or past
    `vocab_size` are never predicted. Per chunk: local logits, then the max, the sum of
    exponentials and the target logit all-reduced over `group` (never the logits). The hidden
    gradient returned is this rank's part (the caller's `copy_to_tp` sums it)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int,
                chunk: int, group, start: int) -> Tensor:
        n, rows = hidden.shape[0], weight.shape[0]
        real = max(0, min(rows, vocab_size - start))  # this rank's predicted rows
        w = weight[:real]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            logits = (hidden[lo:hi] @ w.t()).float()
            top = (logits.max(-1).values if real else
                   torch.full((hi - lo,), -torch.inf, device=hidden.device))
            top = _max_sum(top.clone(), dist.ReduceOp.MAX, group)
            sum_exp = _max_sum(torch.exp(logits - top[:, None]).sum(-1), dist.ReduceOp.SUM,
                               group)
            lse[lo:hi] = top + torch.log(sum_exp)
            lab = labels[lo:hi]
            mine = (lab >= start) & (lab < start + real)
            local = torch.where(mine, lab - start, 0)
            target = torch.where(mine, logits.gather(1, local.unsqueeze(1)).squeeze(1)
                                 if real else 0.0, 0.0)
            target = _max_sum(target, dist.ReduceOp.SUM, group)
            losses[lo:hi] = torch.where(lab != IGNORE_INDEX, lse[lo:hi] - target, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_size, ctx.chunk, ctx.start, ctx.real = vocab_size, chunk, start, real
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk, start, real = ctx.chunk, ctx.start, ctx.real
        w = weight[:real]
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_losses = grad_losses.float()
        for lo in range(0, hidden.shape[0], chunk):
            hi = min(lo + chunk, hidden.shape[0])
            if not real:
                continue
            h = hidden[lo:hi]
            probs = torch.exp((h @ w.t()).float() - lse[lo:hi, None])
            lab = labels[lo:hi]
            mine = (lab >= start) & (lab < start + real)
            local = torch.where(mine, lab - start, 0).unsqueeze(1)
            probs.scatter_add_(1, local, -mine.to(probs.dtype).unsqueeze(1))  # no host sync
            g = (probs * (grad_losses[lo:hi] * (lab != IGNORE_INDEX))[:, None]).to(h.dtype)
            grad_hidden[lo:hi] = g @ w
            grad_weight[:real] += g.t() @ h
        return grad_hidden, grad_weight, None, None, None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int,
                chunk: int) -> Tensor:
        n = hidden.shape[0]
        w = weight[:vocab_size]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            logits = (hidden[lo:hi] @ w.t()).float()
            lse[lo:hi] = torch.logsumexp(logits, dim=-1)
            lab = labels[lo:hi]
            valid = lab != IGNORE_INDEX
            target = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
            losses[lo:hi] = torch.where(valid, lse[lo:hi] - target, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_size, ctx.chunk = vocab_size, chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        v, chunk = ctx.vocab_size, ctx.chunk
        w = weight[:v]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_losses = grad_losses.float()
        for lo in range(0, hidden.shape[0], chunk):
            hi = min(lo + chunk, hidden.shape[0])
            h = hidden[lo:hi]
            probs = torch.exp((h @ w.t()).float() - lse[lo:hi, None])
            lab = labels[lo:hi]
            valid = lab != IGNORE_INDEX
            # minus one at each valid label (ignored rows add -0.0): no host sync, unlike
            # indexing with the boolean mask
            probs.scatter_add_(1, lab.clamp(min=0).unsqueeze(1),
                               -valid.to(probs.dtype).unsqueeze(1))
            g = (probs * (grad_losses[lo:hi] * valid)[:, None]).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[lo:hi] = g @ w
            if grad_weight is not None:
                grad_weight[:v] += g.t() @ h
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int,
                         chunk: int, tp: Optional[tuple] = None) -> Tensor:
    """Per-token losses [N] (fp32) of `hidden` [N, H] through the output layer `weight`
    [padded vocab, H] (only its first `vocab_size` rows are predicted) against `labels` [N],
    `chunk` tokens at a time; equal to
    `F.cross_entropy((hidden @ weight[:vocab_size].T).float(), labels, reduction="none")`."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if tp is not None:  # (tensor group, first vocabulary row of this rank's `weight`)
        return _VocabParallelLinearCrossEntropy.apply(hidden, weight, labels, vocab_size,
                                                      chunk, tp[0], tp[1])
    return _LinearCrossEntropy.apply(hidden, weight, labels, vocab_size, chunk)
