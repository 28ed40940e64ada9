"""Token frequencies of a training split (for balanced hash routing).

`token_frequencies(dataset, vocab)` counts token ids over the documents of a `GPTDataset`'s split
straight from the `.bin` (one pass in chunks, with a progress bar), mixes a `BlendedDataset`'s
parts by their blend weights (each part's counts normalised first, so the result follows the
blend's sampling), and counts any other dataset (e.g. `--mock-data`) over its first samples.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

CHUNK = 1 << 24  # tokens per bincount
OTHER_SAMPLES = 4096  # samples counted of a dataset that is not a GPTDataset


def _gpt_counts(ds, vocab: int, progress: bool) -> np.ndarray:
    data = ds.indexed_dataset
    docs = np.sort(np.asarray(ds.document_ids, dtype=np.int64))
    counts = np.zeros(vocab, dtype=np.int64)
    if docs.size == 0:
        return counts
    itemsize = data.itemsize
    if np.all(np.diff(docs) == 1):  # a split is a contiguous document range: one region
        regions = [(int(data.sequence_pointers[docs[0]]) // itemsize,
                    int(data.sequence_pointers[docs[-1]]) // itemsize
                    + int(data.sequence_lengths[docs[-1]]))]
    else:
        regions = [(int(data.sequence_pointers[d]) // itemsize,
                    int(data.sequence_pointers[d]) // itemsize + int(data.sequence_lengths[d]))
                   for d in docs]
    total = sum(b - a for a, b in regions)
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress,
               desc=f"token frequencies {ds.name}")
    for a, b in regions:
        for start in range(a, b, CHUNK):
            chunk = np.asarray(data._bin[start:min(start + CHUNK, b)], dtype=np.int64)
            counts += np.bincount(chunk, minlength=vocab)[:vocab]
            bar.update(chunk.size)
    bar.close()
    return counts


def token_frequencies(dataset, vocab_size: int, progress: bool = True) -> Tensor:
    """float64 [vocab_size] frequency of each token id in the training split of `dataset`."""
    from megatron_selfroute.data.blended import BlendedDataset
    from megatron_selfroute.data.gpt_dataset import GPTDataset

    if isinstance(dataset, GPTDataset):
        return torch.from_numpy(_gpt_counts(dataset, vocab_size, progress).astype(np.float64))
    if isinstance(dataset, BlendedDataset):
        out = torch.zeros(vocab_size, dtype=torch.float64)
        for part, weight in zip(dataset.datasets, dataset.weights, strict=True):
            c = token_frequencies(part, vocab_size, progress)
            out += weight * c / c.sum().clamp(min=1)
        return out
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for i in range(min(len(dataset), OTHER_SAMPLES)):
        tokens = torch.as_tensor(dataset[i]["tokens"]).reshape(-1).to(torch.int64)
        counts += torch.bincount(tokens, minlength=vocab_size)[:vocab_size].double()
    return counts
