"""MMIDIDX files: exact bytes against Megatron-LM's published layout, round trips, validation."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from megatron_selfroute.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    optimal_dtype,
)


def megatron_idx_bytes(code: int, lengths: list[int], itemsize: int, doc_idx: list[int]) -> bytes:
    """The .idx Megatron-LM writes, spelled out field by field with struct."""
    pointers = [itemsize * sum(lengths[:i]) for i in range(len(lengths))]
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(doc_idx))
        + struct.pack(f"<{len(lengths)}i", *lengths)
        + struct.pack(f"<{len(pointers)}q", *pointers)
        + struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    )


def test_exact_bytes_uint16_documents(tmp_path, write_dataset):
    prefix = write_dataset(str(tmp_path / "tiny"), [[1, 2, 3], [50256], [], [7, 65535]])
    assert (tmp_path / "tiny.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 50256, 7, 65535)
    expected = megatron_idx_bytes(8, [3, 1, 0, 2], 2, [0, 1, 2, 3, 4])
    assert (tmp_path / "tiny.idx").read_bytes() == expected
    ds = IndexedDataset(prefix)
    assert [d.tolist() for d in ds] == [[1, 2, 3], [50256], [], [7, 65535]]


def test_exact_bytes_int32_multi_sequence_document(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.int32)
    builder.add_item([10, -1])
    builder.add_item([70000])
    builder.end_document()
    builder.add_item([5, 6, 7])
    builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    assert (tmp_path / "m.bin").read_bytes() == struct.pack("<6i", 10, -1, 70000, 5, 6, 7)
    assert (tmp_path / "m.idx").read_bytes() == megatron_idx_bytes(4, [2, 1, 3], 4, [0, 2, 3])
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.sequence_lengths.tolist() == [2, 1, 3]
    assert ds.get(2, 1, 2).tolist() == [6, 7]
    assert ds.get(2, 1).tolist() == [6, 7]
    assert [s.tolist() for s in ds[0:2]] == [[10, -1], [70000]]


def test_round_trip_every_document(tmp_path, gpt2, corpus_docs):
    docs = [gpt2.tokenize(d) + [gpt2.eod] for d in corpus_docs]
    builder = IndexedDatasetBuilder(str(tmp_path / "c.bin"), optimal_dtype(gpt2.vocab_size))
    half = len(docs) // 2
    for doc in docs[:half]:
        builder.add_document(doc)
    builder.add_documents(np.concatenate(docs[half:]), [len(d) for d in docs[half:]])
    builder.finalize(str(tmp_path / "c.idx"))
    ds = IndexedDataset(str(tmp_path / "c"))
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == len(docs)
    assert all(ds[i].tolist() == doc for i, doc in enumerate(docs))
    assert ds[-1].tolist() == docs[-1]
    restored = pickle.loads(pickle.dumps(ds))
    assert restored[3].tolist() == docs[3]


def test_merge_file(tmp_path, write_dataset):
    a = write_dataset(str(tmp_path / "a"), [[1, 2], [3]])
    b = write_dataset(str(tmp_path / "b"), [[4, 5, 6]])
    builder = IndexedDatasetBuilder(str(tmp_path / "ab.bin"), np.uint16)
    builder.merge_file_(a)
    builder.add_document([9])
    builder.merge_file_(b)
    builder.finalize(str(tmp_path / "ab.idx"))
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert [d.tolist() for d in ds] == [[1, 2], [3], [9], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    wide = IndexedDatasetBuilder(str(tmp_path / "w.bin"), np.int32)
    with pytest.raises(ValueError, match="dtype"):
        wide.merge_file_(a)


def test_optimal_dtype_and_range_check(tmp_path):
    assert optimal_dtype(50257) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(None) == np.int32
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(ValueError, match="uint16"):
        builder.add_document(np.array([1, 70000], dtype=np.int64))


def test_reader_rejects_bad_files(tmp_path, write_dataset):
    prefix = write_dataset(str(tmp_path / "d"), [[1, 2, 3], [4, 5]])
    idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    with pytest.raises(ValueError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))

    bin_.write_bytes(good_bin[:6])  # three of the five tokens
    with pytest.raises(ValueError, match="d.bin: truncated"):
        IndexedDataset(prefix)
    bin_.write_bytes(good_bin)

    idx.write_bytes(b"GARBAGE!!" + good_idx[9:])
    with pytest.raises(ValueError, match="d.idx: not an MMIDIDX"):
        IndexedDataset(prefix)

    idx.write_bytes(good_idx[:-8])
    with pytest.raises(ValueError, match="d.idx: size"):
        IndexedDataset(prefix)

    idx.write_bytes(good_idx[:17] + bytes([42]) + good_idx[18:])
    with pytest.raises(ValueError, match="d.idx: unknown dtype code 42"):
        IndexedDataset(prefix)

    idx.write_bytes(good_idx)
    assert IndexedDataset(prefix)[1].tolist() == [4, 5]
