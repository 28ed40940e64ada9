"""Blending: exact proportions at every prefix of the index, right samples, splits, caching."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from megatron_selfroute.data.blended import BlendedDataset, build_blending_indices
from megatron_selfroute.data.gpt_dataset import build_train_valid_test_datasets


class Constant(torch.utils.data.Dataset):
    """Item i of dataset d is (d, i): lets a test see where every blended sample came from."""

    def __init__(self, tag: int, size: int) -> None:
        self.tag, self.size = tag, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[int, int]:
        assert 0 <= i < self.size
        return self.tag, i


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.3, 0.5], [1, 7], [0.01, 0.33, 0.66]])
def test_proportions_exact_at_every_prefix(weights):
    size = 3000
    dataset_index, sample_index = build_blending_indices(np.array(weights) / sum(weights), size)
    w = np.array(weights) / sum(weights)
    counts = np.zeros(len(w), dtype=np.int64)
    for n in range(size):
        d = dataset_index[n]
        assert sample_index[n] == counts[d]  # each dataset's samples are taken in order
        counts[d] += 1
        assert np.all(np.abs(counts - w * (n + 1)) <= 1.0 + 1e-9), (n, counts)


def test_blended_dataset_serves_the_indexed_samples(tmp_path):
    parts = [Constant(0, 250), Constant(1, 350), Constant(2, 500)]
    blend = BlendedDataset(parts, [2, 3, 5], 1000, seed=1, cache_dir=str(tmp_path))
    items = [blend[i] for i in range(len(blend))]
    tags = [t for t, _ in items]
    assert [tags.count(d) for d in range(3)] == [200, 300, 500]
    for d in range(3):
        assert [i for t, i in items if t == d] == list(range(tags.count(d)))
    again = BlendedDataset(parts, [0.2, 0.3, 0.5], 1000, seed=1, cache_dir=str(tmp_path))
    assert np.array_equal(again.dataset_index, blend.dataset_index)
    assert len(os.listdir(tmp_path)) == 3  # one cached index, reused
    with pytest.raises(ValueError, match="needs 500 samples from dataset 2 but it has 400"):
        BlendedDataset(parts[:2] + [Constant(2, 400)], [2, 3, 5], 1000, seed=1)
    with pytest.raises(ValueError, match="positive"):
        BlendedDataset(parts, [1, 0, 1], 10, seed=1)


def test_blend_of_prefixes(tmp_path, write_dataset):
    rng = np.random.default_rng(0)
    a = write_dataset(str(tmp_path / "a"), [rng.integers(1, 100, 30).tolist() for _ in range(50)])
    b = write_dataset(str(tmp_path / "b"), [rng.integers(200, 300, 20).tolist() for _ in range(80)])
    train, valid, test = build_train_valid_test_datasets(
        ["0.25", a, "0.75", b], "90,10,0", 16, 9, [400, 40, 5], cache_dir=str(tmp_path / "c")
    )
    assert test is None and (len(train), len(valid)) == (400, 40)
    for blend, n in ((train, 400), (valid, 40)):
        counts = np.bincount(blend.dataset_index, minlength=2)
        assert abs(counts[0] - 0.25 * n) <= 1 and abs(counts[1] - 0.75 * n) <= 1
        for i, (d, k) in enumerate(
            zip(blend.dataset_index, blend.dataset_sample_index, strict=True)
        ):
            assert torch.equal(blend[i]["tokens"], blend.datasets[d][int(k)]["tokens"])
        # Megatron's 0.5% surplus per component.
        sizes = [len(p) for p in blend.datasets]
        assert sizes == [math.ceil(math.ceil(n * w) * 1.005) for w in (0.25, 0.75)]
    tokens = train[0]["tokens"]
    assert bool((tokens < 100).all()) or bool((tokens >= 200).all())
