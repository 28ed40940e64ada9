"""Megatron-style deterministic data order for data-parallel training, and synthetic data.

Micro-step j of training reads global samples [j*M*W, (j+1)*M*W) (M micro-batch, W data-parallel
ranks); rank r takes [j*M*W + r*M, j*M*W + (r+1)*M). Resuming at `consumed_samples` continues the
same order, and every sample carries its global index (`sample_index`), from which the random
router derives global token positions.
"""
from __future__ import annotations

from typing import Iterator

import torch


class PretrainingSampler:
    """Batches of global sample indices for one data-parallel rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


class WithSampleIndex(torch.utils.data.Dataset):
    """Adds the global `sample_index` to each sample dict."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        item = dict(self.dataset[idx])
        item["sample_index"] = torch.tensor(idx, dtype=torch.int64)
        return item


class MockGPTDataset(torch.utils.data.Dataset):
    """Synthetic tokens (--mock-data): sample i is a pure function of (seed, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        self.n, self.seq, self.vocab, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        text = torch.randint(0, self.vocab, (self.seq + 1,), generator=gen)
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(self.seq), "position_ids": torch.arange(self.seq),
                "attention_mask": None}
