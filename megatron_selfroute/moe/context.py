"""Per-forward routing inputs, made once by the model and read by every MoE layer's router."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass(frozen=True)
class RoutingContext:
    """What a router may read besides the hidden states.

    - `token_index`: global position of each token in the data stream (sample index x sequence
      length + position), [B, S] or flat; the random router hashes it. None = arange.
    - `token_ids`: the input token id of each token, same shape (content-free routers such as
      hash routing read it).
    - `iteration`: the optimizer step (the random router hashes it).
    """

    token_index: Optional[Tensor] = None
    token_ids: Optional[Tensor] = None
    iteration: int = 0

    def flat(self) -> "RoutingContext":
        """The same context with per-token tensors flattened to [T]."""
        return RoutingContext(
            None if self.token_index is None else self.token_index.reshape(-1),
            None if self.token_ids is None else self.token_ids.reshape(-1),
            self.iteration)
