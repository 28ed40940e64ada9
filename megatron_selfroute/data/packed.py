"""Loader batches that cross from a worker process to the trainer in one piece.

A DataLoader worker hands each tensor of a batch to the main process as its own shared-memory
file descriptor, received over a socket: with the six tensors of a GPT batch that was about
1 ms of a 22 ms CPU step at tools/bench_train.py's small shape. `PackedCollate` copies a batch's
tensors into one byte buffer in the worker: a small batch (up to `INLINE_BYTES`, e.g. a GPT-2
micro-batch of 16 x 1024 tokens) travels inline through the worker's pipe, a larger one (images)
as one shared-memory tensor. `pin_memory` (the loader's pinning thread calls it on CUDA) makes
it one pinned buffer, so the copy to the GPU stays asynchronous; `unpack` gives the trainer the
batch dict back as views of the buffer (dtypes, shapes and key order kept; values that are not
tensors, e.g. `None`, travel as they are).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

INLINE_BYTES = 4 << 20
_ALIGN = 16  # bytes: every dtype's view of the buffer starts aligned


class PackedBatch:
    """A batch dict's tensors in one byte buffer (`bytes` inline, or a uint8 tensor)."""

    def __init__(self, payload, entries: list) -> None:
        self.payload, self.entries = payload, entries

    def buffer(self) -> torch.Tensor:
        if isinstance(self.payload, (bytes, bytearray)):
            return torch.frombuffer(bytearray(self.payload), dtype=torch.uint8)
        return self.payload

    def pin_memory(self, device=None) -> "PackedBatch":  # noqa: ARG002 - DataLoader's signature
        return PackedBatch(self.buffer().pin_memory(), self.entries)

    def unpack(self) -> dict:
        buf, out = self.buffer(), {}
        for key, dtype, shape, start, nbytes in self.entries:
            if dtype is None:
                out[key] = shape  # the value itself
            else:
                out[key] = buf[start:start + nbytes].view(dtype).view(shape)
        return out


def pack(batch: Any) -> Any:
    """A dict batch as a `PackedBatch`; anything else unchanged."""
    if not isinstance(batch, dict):
        return batch
    entries, offset = [], 0
    for key, value in batch.items():
        if torch.is_tensor(value):
            offset = -(-offset // _ALIGN) * _ALIGN
            nbytes = value.numel() * value.element_size()
            entries.append((key, value.dtype, tuple(value.shape), offset, nbytes))
            offset += nbytes
        else:
            entries.append((key, None, value, 0, 0))
    buf = torch.empty(offset, dtype=torch.uint8)
    for key, dtype, _, start, nbytes in entries:
        if dtype is not None and nbytes:
            buf[start:start + nbytes].copy_(batch[key].contiguous().reshape(-1).view(torch.uint8))
    return PackedBatch(buf.numpy().tobytes() if offset <= INLINE_BYTES else buf, entries)


class PackedCollate:
    """`collate`, then the batch packed (picklable: it runs in the loader's workers)."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> Any:
        return pack(self.collate(samples))


class Unpacked:
    """Iterates a DataLoader whose collate is `PackedCollate`, yielding the batch dicts."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch.unpack() if isinstance(batch, PackedBatch) else batch
