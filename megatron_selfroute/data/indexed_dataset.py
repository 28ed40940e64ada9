"""Megatron-LM's memory-mapped indexed dataset (``MMIDIDX``): a ``.bin`` of tokens plus an ``.idx``.

Byte-compatible with ``megatron/core/datasets/indexed_dataset.py``, so files made here train in
Megatron-LM and the other way round. The ``.idx`` layout (all little-endian):

==========  ===========================  =====================================================
bytes       field                        value
==========  ===========================  =====================================================
9           magic                        ``b"MMIDIDX\\x00\\x00"``
8           version ``<Q``               1
1           dtype code ``<B``            1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                         6 float64, 7 float32, 8 uint16 (of the ``.bin``)
8           sequence count ``<Q``        S
8           document count ``<Q``        D + 1 (length of the document index array)
4 * S       sequence lengths             int32, tokens per sequence
8 * S       sequence pointers            int64, byte offset of each sequence in the ``.bin``
8 * (D+1)   document indices             int64, ``0, ..., S``: document d holds sequences
                                         ``[doc[d], doc[d+1])``
==========  ===========================  =====================================================

Megatron's multimodal files append one int8 mode per sequence; the reader accepts and ignores it.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8
DTYPES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
DTYPE_CODES = {np.dtype(t): code for code, t in DTYPES.items()}


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Token dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix: str) -> str:
    """Path of the ``.idx`` file of a dataset prefix."""
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    """Path of the ``.bin`` file of a dataset prefix."""
    return prefix + ".bin"


class IndexedDatasetBuilder:
    """Streams sequences into a ``.bin`` file and writes the matching ``.idx`` on ``finalize``.

    Lengths and document boundaries are kept in compact ``array``s (not Python lists) so that
    millions of documents cost a few bytes each.
    """

    def __init__(self, bin_path: str, dtype: type[np.number] = np.int32) -> None:
        if np.dtype(dtype) not in DTYPE_CODES:
            raise ValueError(f"unsupported indexed dataset dtype {dtype}")
        self.dtype = np.dtype(dtype)
        self._data_file = open(bin_path, "wb")
        self._sequence_lengths = array("i")
        self._document_indices = array("q", [0])

    def _as_tokens(self, tokens: object) -> np.ndarray:
        """Convert to the builder's dtype, refusing integer values the dtype cannot hold."""
        if hasattr(tokens, "numpy"):  # a torch tensor
            tokens = tokens.numpy()
        arr = np.asarray(tokens)
        if arr.size and self.dtype.kind in "iu" and arr.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(
                    f"token values [{arr.min()}, {arr.max()}] do not fit {self.dtype.name}"
                )
        return np.ascontiguousarray(arr.reshape(-1), dtype=self.dtype)

    def add_item(self, tokens: object) -> None:
        """Append one sequence to the current document (close it with ``end_document``)."""
        arr = self._as_tokens(tokens)
        self._data_file.write(arr.tobytes())
        self._sequence_lengths.append(arr.size)

    def end_document(self) -> None:
        """Close the current document: it owns the sequences added since the previous close."""
        self._document_indices.append(len(self._sequence_lengths))

    def add_document(self, tokens: object, lengths: Sequence[int] | None = None) -> None:
        """Append a whole document: ``tokens`` split into sequences of ``lengths`` (default one)."""
        arr = self._as_tokens(tokens)
        lengths = [arr.size] if lengths is None else list(lengths)
        if sum(lengths) != arr.size:
            raise ValueError(f"lengths sum to {sum(lengths)}, document has {arr.size} tokens")
        self._data_file.write(arr.tobytes())
        self._sequence_lengths.extend(lengths)
        self._document_indices.append(len(self._sequence_lengths))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many single-sequence documents at once: ``tokens`` concatenated, ``lengths``.

        The fast path for preprocessing: one write and two array extensions per batch.
        """
        arr = self._as_tokens(tokens)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != arr.size:
            raise ValueError(f"lengths sum to {lengths.sum()}, batch has {arr.size} tokens")
        self._data_file.write(arr.tobytes())
        start = len(self._sequence_lengths)
        self._sequence_lengths.frombytes(lengths.tobytes())
        ends = np.arange(start + 1, start + 1 + lengths.size, dtype=np.int64)
        self._document_indices.frombytes(ends.tobytes())

    def merge_file_(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix`` (same dtype required)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {other.dtype} differs from builder's {self.dtype}")
        offset = len(self._sequence_lengths)
        self._sequence_lengths.frombytes(other.sequence_lengths.astype(np.int32).tobytes())
        docs = other.document_indices[1:].astype(np.int64) + offset
        self._document_indices.frombytes(docs.tobytes())
        del other
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._data_file)

    def close(self) -> None:
        """Close the ``.bin`` without writing an index (e.g. to abandon a failed build)."""
        self._data_file.close()

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the ``.idx`` in Megatron's layout."""
        self.close()
        lengths = np.frombuffer(self._sequence_lengths, dtype=np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", len(self._document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self._document_indices, dtype=np.int64).tobytes())


class DataReadError(ValueError):
    """A region of a ``.bin`` that cannot be read now (file shrunk, I/O error), named by file,
    sequence (document) and byte offset."""


class IndexedDataset:
    """Read-only view of an ``MMIDIDX`` dataset; sequences are zero-copy numpy memmap slices
    (``mmap=False``: positioned reads, Megatron core's ``--no-mmap-bin-files``).

    The header, the ``.idx`` size and the extent of the ``.bin`` are validated on open, so a
    truncated or foreign file fails at once with a ``ValueError`` naming it rather than as
    garbage tokens mid-training. Every read checks that the ``.bin`` still holds the region
    (a file truncated or replaced under a running job would otherwise kill a loader worker with
    SIGBUS) and turns an I/O error into a ``DataReadError`` naming file, document and offset.
    Pickles by prefix (for DataLoader workers).
    """

    def __init__(self, prefix: str, mmap: bool = True) -> None:
        self.prefix, self.mmap = prefix, mmap
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"indexed dataset {prefix!r}: missing file {path}")
        self._read_index(idx_path)
        bin_size = os.path.getsize(bin_path)
        if bin_size % self.itemsize:
            raise ValueError(f"{bin_path}: size {bin_size} is not a multiple of {self.dtype}")
        if self.sequence_lengths.size:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.itemsize
            if end > bin_size or int(self.sequence_pointers.min()) < 0:
                raise ValueError(
                    f"{bin_path}: truncated or mismatched data file ({bin_size} bytes, "
                    f"index points to {end})"
                )
        self.bin_path = bin_path
        self._fd = os.open(bin_path, os.O_RDONLY)
        if bin_size and mmap:
            self._bin = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self._bin = np.empty(0, dtype=self.dtype)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _read_index(self, idx_path: str) -> None:
        """Parse and validate the ``.idx`` header and map its three arrays."""
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise ValueError(f"{idx_path}: not an MMIDIDX index file (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(INDEX_HEADER) :])
        if version != INDEX_VERSION:
            raise ValueError(f"{idx_path}: unsupported MMIDIDX version {version}")
        if code not in DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        self.itemsize = self.dtype.itemsize
        size = os.path.getsize(idx_path)
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if size not in (expected, expected + n_seq):
            raise ValueError(f"{idx_path}: size {size} bytes, header implies {expected}")
        buf = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, offset)
        docs = self.document_indices
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
            raise ValueError(f"{idx_path}: corrupt document index")

    def __getstate__(self) -> tuple[str, bool]:
        return self.prefix, self.mmap

    def __setstate__(self, state) -> None:
        prefix, mmap = state if isinstance(state, tuple) else (state, True)
        self.__init__(prefix, mmap)

    def __len__(self) -> int:
        """Number of sequences (equal to the number of documents for GPT text data)."""
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return int(self.document_indices.size - 1)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end by default)."""
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence of {seq_len}")
        start = int(self.sequence_pointers[idx]) // self.itemsize + offset
        first, nbytes = start * self.itemsize, length * self.itemsize
        where = f"{self.bin_path}: document {idx}, bytes {first}-{first + nbytes - 1}"
        try:
            if self.mmap:
                size = os.fstat(self._fd).st_size
                if first + nbytes > size:
                    raise DataReadError(f"{where}: beyond the end of the file ({size} bytes "
                                        "now; was it truncated or rewritten while training?)")
                return self._bin[start : start + length]
            data = os.pread(self._fd, nbytes, first)
        except OSError as e:
            raise DataReadError(f"{where}: cannot be read ({e.strerror or e})") from None
        if len(data) != nbytes:
            raise DataReadError(f"{where}: read {len(data)} of {nbytes} bytes (the file is "
                                "shorter than its index says; was it truncated or rewritten?)")
        return np.frombuffer(data, dtype=self.dtype)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        """One sequence's tokens, or a list of them for a contiguous slice."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an IndexedDataset must be contiguous")
            return [self.get(i) for i in range(start, stop)]
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        return self.get(int(idx) % len(self))

    @staticmethod
    def exists(prefix: str) -> bool:
        """Whether both files of ``prefix`` exist."""
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))
