"""GPT samples against a naive concatenate-and-slice reference; epochs, splits, caching, masks."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from megatron_selfroute.data.gpt_dataset import (
    GPTDataset,
    build_train_valid_test_datasets,
    collate_gpt_samples,
    get_ltor_masks_and_position_ids,
    parse_split,
)
from megatron_selfroute.data.indexed_dataset import IndexedDataset

EOD = 0


def random_docs(n: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Documents of random length (some empty) ending in EOD, tokens in [1, 50000)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = rng.integers(1, 50000, size=int(rng.integers(0, max_len))).tolist()
        docs.append(body + [EOD] if rng.random() > 0.1 else body)
    return docs


def reference_windows(docs, document_index, seq_length: int) -> list[list[int]]:
    """Every (seq_length + 1)-token window, stride seq_length, of the documents in order."""
    stream = [t for d in document_index for t in docs[int(d)]]
    count = (len(stream) - 1) // seq_length
    return [stream[k * seq_length : k * seq_length + seq_length + 1] for k in range(count)]


@pytest.fixture
def docs_prefix(tmp_path, write_dataset):
    docs = random_docs(60, 40)
    return docs, write_dataset(str(tmp_path / "docs"), docs)


def test_samples_equal_concatenate_and_slice(tmp_path, docs_prefix):
    docs, prefix = docs_prefix
    ids = np.arange(10, 50)
    ds = GPTDataset(IndexedDataset(prefix), ids, 300, 16, seed=3, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 300 and ds.num_epochs > 2
    windows = reference_windows(docs, ds.document_index, 16)
    assert len(windows) == len(ds.shuffle_index) >= 300
    for i in range(len(ds)):
        window = windows[int(ds.shuffle_index[i])]
        sample = ds[i]
        assert sample["tokens"].tolist() == window[:-1]
        assert sample["labels"].tolist() == window[1:]
        assert sample["tokens"].dtype == torch.int64 and sample["attention_mask"] is None
        assert sample["position_ids"].tolist() == list(range(16))
        assert sample["loss_mask"].tolist() == [1.0] * 16


def test_every_document_in_every_epoch(tmp_path, docs_prefix):
    _, prefix = docs_prefix
    ids = np.arange(5, 45)
    ds = GPTDataset(IndexedDataset(prefix), ids, 500, 8, seed=1, cache_dir=str(tmp_path))
    epochs = np.asarray(ds.document_index).reshape(ds.num_epochs, ids.size)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == ids.tolist()
    assert not all((epochs[0] == e).all() for e in epochs[1:])  # reshuffled per epoch
    # Windows inside the complete epochs come first (shuffled), then the final epoch's.
    lengths = IndexedDataset(prefix).sequence_lengths[ids].sum()
    num_full = ((ds.num_epochs - 1) * int(lengths) - 1) // 8
    shuffle = np.asarray(ds.shuffle_index)
    assert sorted(shuffle[:num_full].tolist()) == list(range(num_full))
    assert sorted(shuffle.tolist()) == list(range(shuffle.size))


def test_one_epoch_when_num_samples_is_none(tmp_path, docs_prefix):
    docs, prefix = docs_prefix
    ds = GPTDataset(IndexedDataset(prefix), np.arange(60), None, 16, 5, str(tmp_path))
    tokens = sum(len(d) for d in docs)
    assert ds.num_epochs == 1 and len(ds) == (tokens - 1) // 16


def test_deterministic_and_cached(tmp_path, docs_prefix):
    _, prefix = docs_prefix
    data = IndexedDataset(prefix)
    args = (data, np.arange(60), 100, 16, 7)
    a = GPTDataset(*args, cache_dir=str(tmp_path / "a"))
    b = GPTDataset(*args, cache_dir=str(tmp_path / "b"))
    assert not a.loaded_from_cache and not b.loaded_from_cache
    for key in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    files = sorted(os.listdir(tmp_path / "a"))
    assert len(files) == 4 and all(f.startswith(a.unique_description_hash) for f in files)
    again = GPTDataset(*args, cache_dir=str(tmp_path / "a"))
    assert again.loaded_from_cache and sorted(os.listdir(tmp_path / "a")) == files
    assert all(torch.equal(again[i]["tokens"], a[i]["tokens"]) for i in range(len(a)))
    other = GPTDataset(data, np.arange(60), 100, 16, 8, cache_dir=str(tmp_path / "a"))
    assert not other.loaded_from_cache and len(os.listdir(tmp_path / "a")) == 8
    assert not np.array_equal(other.document_index, a.document_index)
    # Default cache directory: index-cache beside the data.
    GPTDataset(*args)
    assert os.path.isdir(os.path.join(os.path.dirname(prefix), "index-cache"))


def test_builds_a_million_tokens_fast(tmp_path, write_dataset):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=int(n)).tolist() for n in rng.integers(1, 2000, 1000)]
    data = IndexedDataset(write_dataset(str(tmp_path / "big"), docs))
    assert data.sequence_lengths.sum() > 900_000
    start = time.perf_counter()
    ds = GPTDataset(data, np.arange(1000), 20_000, 128, 0, str(tmp_path / "c"))
    elapsed = time.perf_counter() - start
    assert len(ds) == 20_000 and ds.num_epochs == 3
    assert elapsed < 2.0, f"index build took {elapsed:.2f} s"


def test_parse_split_like_megatron():
    assert parse_split("969,30,1", 1000) == [0, 969, 999, 1000]
    assert parse_split("969, 30, 1", 7) == [0, 7, 7, 7]
    assert parse_split("1,1,1", 10) == [0, 4, 7, 10]
    assert parse_split("98/2", 50) == [0, 49, 50, 50]
    assert parse_split("100", 3) == [0, 3, 3, 3]
    for bad in ("0,0,0", "a,b", "1,-1,1"):
        with pytest.raises(ValueError, match="bad split"):
            parse_split(bad, 10)


E = 0
TOKENS = np.array([5, E, 7, 8, E, 9])


def test_masks_default_is_plain_causal():
    mask, loss, pos = get_ltor_masks_and_position_ids(TOKENS, E, False, False, False)
    assert mask is None and loss.tolist() == [1.0] * 6 and pos.tolist() == list(range(6))


def test_reset_position_ids_and_eod_mask_loss():
    _, loss, pos = get_ltor_masks_and_position_ids(TOKENS, E, True, False, True)
    assert pos.tolist() == [0, 1, 0, 1, 2, 0]
    assert loss.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    _, _, pos = get_ltor_masks_and_position_ids(np.array([1, 2, E]), E, True, False, False)
    assert pos.tolist() == [0, 1, 2]


def test_reset_attention_mask_blocks_across_eod():
    mask, _, pos = get_ltor_masks_and_position_ids(TOKENS, E, False, True, False)
    visible = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask.dtype == bool and mask.shape == (1, 6, 6)
    assert (~mask[0]).astype(int).tolist() == visible
    assert pos.tolist() == list(range(6))  # positions untouched without reset_position_ids


def test_dataset_options_and_collate(tmp_path, docs_prefix):
    _, prefix = docs_prefix
    ds = GPTDataset(
        IndexedDataset(prefix),
        np.arange(60),
        40,
        16,
        2,
        str(tmp_path),
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
        eod_token=EOD,
    )
    for i in range(len(ds)):
        s = ds[i]
        tokens = s["tokens"].numpy()
        mask, loss, pos = get_ltor_masks_and_position_ids(tokens, EOD, True, True, True)
        assert np.array_equal(s["position_ids"].numpy(), pos)
        assert np.array_equal(s["attention_mask"].numpy(), mask)
        assert np.array_equal(s["loss_mask"].numpy(), loss)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_gpt_samples)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, 16) and batch["attention_mask"].shape == (4, 1, 16, 16)
    plain = GPTDataset(IndexedDataset(prefix), np.arange(60), 8, 16, 2, str(tmp_path))
    batch = collate_gpt_samples([plain[0], plain[1]])
    assert batch["attention_mask"] is None and batch["labels"].shape == (2, 16)
    with pytest.raises(ValueError, match="eod_token"):
        GPTDataset(
            IndexedDataset(prefix), np.arange(60), 8, 16, 2, str(tmp_path), eod_mask_loss=True
        )


def test_train_valid_test_split_sizes(tmp_path, write_dataset):
    docs = random_docs(100, 30, seed=4)
    prefix = write_dataset(str(tmp_path / "s"), docs)
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "80,15,5", 8, 1234, [500, 40, 10], cache_dir=str(tmp_path / "c")
    )
    assert (len(train), len(valid), len(test)) == (500, 40, 10)
    assert train.document_ids.tolist() == list(range(0, 80))
    assert valid.document_ids.tolist() == list(range(80, 95))
    assert test.document_ids.tolist() == list(range(95, 100))
    windows = reference_windows(docs, valid.document_index, 8)
    assert valid[3]["tokens"].tolist() == windows[int(valid.shuffle_index[3])][:-1]
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "100,0,0", 8, 1234, [50, 40, 10], cache_dir=str(tmp_path / "c")
    )
    assert len(train) == 50 and valid is None and test is None
    _, valid, _ = build_train_valid_test_datasets(
        [prefix], "80,15,5", 8, 1234, [50, 0, 10], cache_dir=str(tmp_path / "c")
    )
    assert valid is None


def test_split_errors_name_prefix_and_split(tmp_path, write_dataset):
    prefix = write_dataset(str(tmp_path / "small"), [[1, 2, 3]] * 20)
    with pytest.raises(ValueError, match=r"small split 'test'.*fewer than one sample"):
        build_train_valid_test_datasets([prefix], "80,15,5", 8, 1, [10, 1, 1], str(tmp_path))
    empty = write_dataset(str(tmp_path / "empty"), [])
    with pytest.raises(ValueError, match="empty: empty dataset"):
        build_train_valid_test_datasets([empty], "1,0,0", 8, 1, [10, 0, 0], str(tmp_path))
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        build_train_valid_test_datasets(["x", prefix], "1,0,0", 8, 1, [10, 0, 0])
