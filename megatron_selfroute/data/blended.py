"""Mix several datasets in fixed proportions, with Megatron-LM's greedy blending index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_selfroute.data.gpt_dataset import cached_arrays


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's ``build_blending_indices``: which dataset, and which of its samples, per slot.

    At position ``n`` it picks the dataset whose count lags its target ``weight * max(n, 1)``
    the most (ties to the lowest index), so after any prefix of the index every dataset's count
    is within one sample of its exact share. Returns ``(dataset_index int16,
    dataset_sample_index int64)``. A plain loop (about 0.5 us per sample), hence the caching in
    ``BlendedDataset``.
    """
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = [0] * size
    sample_index = [0] * size
    others = range(1, len(w))
    for n in range(size):
        target = n if n > 1 else 1.0
        best, best_error = 0, w[0] * target - counts[0]
        for i in others:
            error = w[i] * target - counts[i]
            if error > best_error:
                best, best_error = i, error
        dataset_index[n] = best
        sample_index[n] = counts[best]
        counts[best] += 1
    return np.array(dataset_index, dtype=np.int16), np.array(sample_index, dtype=np.int64)


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in exact proportion to ``weights``.

    Deterministic: the index depends only on the normalised weights and ``size`` (``seed`` is
    recorded in the cache description, as in Megatron, not used for sampling). With
    ``cache_dir`` the index is cached as ``.npy`` under an MD5 of that description.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int,
        seed: int,
        cache_dir: str | None = None,
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError(f"at most {np.iinfo(np.int16).max} datasets can be blended")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        if size <= 0:
            raise ValueError(f"blended dataset size must be positive, got {size}")
        self.datasets = list(datasets)
        self.weights = (w / w.sum()).tolist()
        self.size = int(size)
        description = {
            "class": "BlendedDataset",
            "weights": self.weights,
            "size": self.size,
            "seed": int(seed),
        }

        def build() -> dict[str, np.ndarray]:
            dataset_index, sample_index = build_blending_indices(self.weights, self.size)
            return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

        if cache_dir is None:
            arrays = build()
        else:
            _, arrays, _ = cached_arrays(cache_dir, "BlendedDataset", description, build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for i, (ds, n) in enumerate(zip(self.datasets, needed, strict=True)):
            if n > len(ds):
                name = getattr(getattr(ds, "indexed_dataset", None), "prefix", f"dataset {i}")
                raise ValueError(f"blend needs {n} samples from {name} but it has {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> object:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]
