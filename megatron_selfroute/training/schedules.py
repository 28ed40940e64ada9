"""Learning-rate schedule as a pure function of the iteration (so resume needs no state)."""
from __future__ import annotations

import math

from megatron_selfroute.config import TrainConfig


def learning_rate(tr: TrainConfig, iteration: int, train_iters: int) -> float:
    """Linear warm-up to --lr over --lr-warmup-iters, then cosine/linear/constant decay to
    --min-lr at --lr-decay-iters (default: the training length). `iteration` counts from 0."""
    warmup = tr.lr_warmup_iters
    if warmup > 0 and iteration < warmup:
        return tr.lr * (iteration + 1) / warmup
    if tr.lr_decay_style == "constant":
        return tr.lr
    decay_iters = tr.lr_decay_iters or train_iters
    span = max(decay_iters - warmup, 1)
    progress = min(max(iteration - warmup, 0) / span, 1.0)
    if tr.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return tr.min_lr + coeff * (tr.lr - tr.min_lr)
