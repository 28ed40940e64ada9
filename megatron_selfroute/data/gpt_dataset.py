"""GPT pretraining samples from an indexed dataset, with Megatron-LM's three-index scheme.

The documents of a split are concatenated (in a shuffled order) into one token stream, and sample
``k`` is the window ``[k * seq_length, k * seq_length + seq_length + 1)`` of that stream: inputs
are its first ``seq_length`` tokens and labels its last ``seq_length``, and samples cross
document boundaries. Three arrays make that cheap and reproducible:

- ``document_index``: document ids in stream order, one independent permutation per epoch, with
  as many epochs as ``num_samples`` needs (so every document appears once in each epoch);
- ``sample_index``: ``[num_samples_built + 1, 2]``, row ``k`` = (position in ``document_index``,
  token offset in that document) where window ``k`` starts; a window ends where the next starts
  (Megatron's layout: the extra label token is shared);
- ``shuffle_index``: the order in which windows are served. Windows lying entirely in the
  complete epochs are shuffled among themselves and those reaching into the final, partial epoch
  separately (Megatron's ``separate_final_epoch``), so early samples never favour a subset.

The arrays depend only on the data, the split's documents, ``seq_length``, ``num_samples`` and
``seed``; they are cached as ``.npy`` under a name holding the MD5 of a JSON description of those
parameters, as Megatron does, so every rank and every restart sees the same samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_selfroute.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
# Megatron's surplus: each blended component builds 0.5% more samples than its exact share.
BLEND_SURPLUS = 0.005


def parse_split(split: str, num_documents: int) -> list[int]:
    """Document boundaries ``[0, train_end, valid_end, num_documents]`` for a split string.

    ``"969,30,1"`` (or ``"969/30/1"``) gives weights normalised to sum 1, missing entries count
    as 0; each part is rounded to whole documents and any rounding surplus is taken off every
    boundary so the last one is ``num_documents``, exactly as Megatron's
    ``get_train_valid_test_split_``.
    """
    try:
        weights = [float(s) for s in split.replace("/", ",").split(",")]
    except ValueError as e:
        raise ValueError(f"bad split {split!r}: expected numbers like '969,30,1'") from e
    weights = (weights + [0.0] * 3)[:3]
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"bad split {split!r}: weights must be >= 0 with a positive sum")
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * float(num_documents))))
    diff = bounds[-1] - num_documents
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def get_ltor_masks_and_position_ids(
    tokens: np.ndarray,
    eod_token: int | None,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Left-to-right masks for one sample, with Megatron's semantics (vectorised).

    Returns ``(attention_mask, loss_mask, position_ids)``. ``attention_mask`` is ``None`` unless
    ``reset_attention_mask``: then a bool ``[1, s, s]`` array, True where attention is blocked
    (causal, and no token sees across an eod). ``reset_position_ids`` restarts positions at 0
    after every eod; ``eod_mask_loss`` zeroes the loss where the *input* token is the eod.
    """
    s = tokens.shape[0]
    loss_mask = np.ones(s, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = np.arange(s, dtype=np.int64)
    # segment_start[i]: first position of the document (segment) that position i belongs to.
    segment_start = np.zeros(s, dtype=np.int64)
    if reset_position_ids or reset_attention_mask:
        starts = np.flatnonzero(tokens == eod_token) + 1
        starts = starts[starts < s]
        segment_start[starts] = starts
        segment_start = np.maximum.accumulate(segment_start)
    attention_mask = None
    if reset_attention_mask:
        cols = np.arange(s)
        visible = (cols[None, :] <= cols[:, None]) & (cols[None, :] >= segment_start[:, None])
        attention_mask = ~visible[None]
    if reset_position_ids:
        position_ids -= segment_start
    return attention_mask, loss_mask, position_ids


def default_cache_dir(prefix: str) -> str:
    """Where index arrays are cached by default: ``index-cache`` beside the data files."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def _index_dtype(max_value: int) -> type[np.integer]:
    """Smallest of int32/int64 that holds ``max_value``."""
    return np.int32 if max_value < np.iinfo(np.int32).max else np.int64


def cached_arrays(
    cache_dir: str, stem: str, description: dict, build: Callable[[], dict[str, np.ndarray]]
) -> tuple[str, dict[str, np.ndarray], bool]:
    """Load the arrays cached for ``description`` or build and cache them atomically.

    Files are ``{cache_dir}/{md5}-{stem}-{key}.npy`` plus a ``-description.json`` (written last,
    so its presence means the arrays are complete). Returns ``(md5, arrays, loaded)``. A cache
    directory that cannot be written only costs a warning: the arrays stay in memory.
    """
    text = json.dumps(description, indent=4, sort_keys=True)
    digest = hashlib.md5(text.encode("utf-8")).hexdigest()
    base = os.path.join(cache_dir, f"{digest}-{stem}")
    desc_path = base + "-description.json"
    if os.path.isfile(desc_path):
        with open(desc_path, encoding="utf-8") as f:
            keys = json.load(f)["arrays"]
        paths = {k: f"{base}-{k}.npy" for k in keys}
        if all(os.path.isfile(p) for p in paths.values()):
            return digest, {k: np.load(p, mmap_mode="r") for k, p in paths.items()}, True
    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for key, arr in arrays.items():
            _atomic_write(f"{base}-{key}.npy", lambda f, a=arr: np.save(f, a))
        payload = json.dumps({"description": description, "arrays": list(arrays)}, indent=4)
        _atomic_write(desc_path, lambda f: f.write(payload.encode("utf-8")))
    except OSError as e:
        warnings.warn(
            f"cannot cache dataset indices in {cache_dir} ({e}); keeping them in memory",
            stacklevel=2,
        )
    return digest, arrays, False


def _atomic_write(path: str, write: Callable) -> None:
    """Write through a temporary file and rename, so concurrent ranks never read half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length, document-crossing GPT samples over a subset of an indexed dataset.

    Args:
        indexed_dataset: the tokens; GPT data has one sequence per document.
        document_ids: the documents of this split (e.g. a range from ``parse_split``).
        num_samples: samples wanted (``len(self)``); ``None`` means one epoch's worth.
        seq_length: tokens per sample input (each sample reads ``seq_length + 1`` tokens).
        seed: seed of the document and sample shuffles.
        cache_dir: where the index arrays are cached; default ``index-cache`` beside the data.
        name: the split name, used in file names and errors.
        reset_position_ids, reset_attention_mask, eod_mask_loss: Megatron's options, see
            ``get_ltor_masks_and_position_ids``; they need ``eod_token``.

    Items are dicts of tensors: ``tokens``, ``labels`` (int64, ``[seq_length]``), ``loss_mask``
    (float32), ``position_ids`` (int64) and ``attention_mask`` (bool ``[1, s, s]``, True =
    blocked; ``None`` when plain causal attention applies, see ``collate_gpt_samples``).
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        document_ids: Sequence[int] | np.ndarray,
        num_samples: int | None,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
        name: str = "train",
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        eod_mask_loss: bool = False,
        eod_token: int | None = None,
    ) -> None:
        self.indexed_dataset = indexed_dataset
        self.name = name
        self.seq_length = int(seq_length)
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.eod_mask_loss = eod_mask_loss
        self.eod_token = eod_token
        prefix = indexed_dataset.prefix
        if (reset_position_ids or reset_attention_mask or eod_mask_loss) and eod_token is None:
            raise ValueError("reset_position_ids/reset_attention_mask/eod_mask_loss need eod_token")
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"{prefix} split {name!r}: num_samples must be positive")
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        if self.document_ids.size and (
            self.document_ids.min() < 0 or self.document_ids.max() >= len(indexed_dataset)
        ):
            raise ValueError(f"{prefix} split {name!r}: document ids out of range")
        tokens_per_epoch = int(indexed_dataset.sequence_lengths[self.document_ids].sum())
        if tokens_per_epoch < self.seq_length + 1:
            raise ValueError(
                f"{prefix} split {name!r}: {tokens_per_epoch} tokens in "
                f"{self.document_ids.size} documents, fewer than one sample of "
                f"seq_length + 1 = {self.seq_length + 1}"
            )
        requested = 1 if num_samples is None else num_samples * self.seq_length + 1
        self.num_epochs = max(1, -(-requested // tokens_per_epoch))
        description = {
            "class": "GPTDataset",
            "dataset_path": os.path.abspath(prefix),
            "dataset_sequences": len(indexed_dataset),
            "dataset_tokens": int(indexed_dataset.sequence_lengths.sum(dtype=np.int64)),
            "name": name,
            "document_ids_md5": hashlib.md5(self.document_ids.tobytes()).hexdigest(),
            "num_samples": num_samples,
            "seq_length": self.seq_length,
            "seed": int(seed),
        }
        cache_dir = cache_dir or default_cache_dir(prefix)
        self.unique_description_hash, arrays, self.loaded_from_cache = cached_arrays(
            cache_dir,
            f"GPTDataset-{name}",
            description,
            lambda: self._build_indices(tokens_per_epoch, int(seed)),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self._len = self.shuffle_index.size if num_samples is None else num_samples

    def _build_indices(self, tokens_per_epoch: int, seed: int) -> dict[str, np.ndarray]:
        """Build the document, sample and shuffle indices (vectorised numpy)."""
        rng = np.random.RandomState(seed)
        doc_dtype = _index_dtype(int(self.document_ids.max()))
        document_index = np.concatenate(
            [rng.permutation(self.document_ids) for _ in range(self.num_epochs)]
        ).astype(doc_dtype)
        lengths = self.indexed_dataset.sequence_lengths[document_index]
        cumulative = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=cumulative[1:])
        num_built = (int(cumulative[-1]) - 1) // self.seq_length
        starts = np.arange(num_built + 1, dtype=np.int64) * self.seq_length
        position = np.searchsorted(cumulative, starts, side="right") - 1
        sample_index = np.stack([position, starts - cumulative[position]], axis=1)
        sample_index = sample_index.astype(_index_dtype(int(document_index.size)))
        # Windows entirely inside the complete epochs vs. those reaching into the final one.
        num_full = ((self.num_epochs - 1) * tokens_per_epoch - 1) // self.seq_length
        num_full = num_built if self.num_epochs == 1 else max(num_full, 0)
        shuffle_dtype = np.uint32 if num_built < np.iinfo(np.uint32).max - 1 else np.int64
        first = np.arange(num_full, dtype=shuffle_dtype)
        rng.shuffle(first)
        last = np.arange(num_full, num_built, dtype=shuffle_dtype)
        rng.shuffle(last)
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": np.concatenate([first, last]),
        }

    def __len__(self) -> int:
        return int(self._len)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of served sample ``idx`` (before the input/label split)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        k = int(self.shuffle_index[idx])
        (doc_first, offset_first), (doc_last, offset_last) = self.sample_index[k : k + 2].tolist()
        ds, docs = self.indexed_dataset, self.document_index
        if doc_first == doc_last:
            return np.array(ds.get(docs[doc_first], offset_first, offset_last - offset_first + 1))
        parts = [ds.get(docs[doc_first], offset_first)]
        parts += [ds.get(docs[d]) for d in range(doc_first + 1, doc_last)]
        parts.append(ds.get(docs[doc_last], 0, offset_last + 1))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor | None]:
        text = self.sample_tokens(int(idx)).astype(np.int64)
        tokens, labels = text[:-1], text[1:]
        attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
            tokens,
            self.eod_token,
            self.reset_position_ids,
            self.reset_attention_mask,
            self.eod_mask_loss,
        )
        return {
            "tokens": torch.from_numpy(tokens.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "attention_mask": None if attention_mask is None else torch.from_numpy(attention_mask),
        }


def collate_gpt_samples(batch: list[dict]) -> dict[str, torch.Tensor | None]:
    """Stack GPT samples into a batch; keys whose value is ``None`` stay ``None``.

    ``torch.utils.data.default_collate`` rejects ``None``, hence this collate_fn.
    """
    return {
        key: None if batch[0][key] is None else torch.stack([item[key] for item in batch])
        for key in batch[0]
    }


def parse_data_path(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """``[prefix]`` or Megatron's blend ``[w1, p1, w2, p2, ...]`` -> ``[(weight, prefix), ...]``."""
    items = [str(x).strip() for x in data_path]
    if len(items) == 1:
        return [(1.0, items[0])]
    try:
        pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
    except (ValueError, IndexError) as e:
        raise ValueError(
            f"data path {items}: expected one prefix or weight/prefix pairs 'w1 p1 w2 p2 ...'"
        ) from e
    if any(not (w > 0 and math.isfinite(w)) for w, _ in pairs):
        raise ValueError(f"data path {items}: blend weights must be positive")
    return pairs


def build_train_valid_test_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: Sequence[int | None],
    cache_dir: str | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    eod_token: int | None = None,
    mmap: bool = True,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """Train, valid and test datasets of one prefix or a weighted blend of prefixes.

    Each prefix's documents are split by ``parse_split``. A split whose documents are empty or
    whose requested sample count is 0 is ``None``. For a blend, every prefix builds
    ``ceil(ceil(n * weight) * 1.005)`` samples of the split and a ``BlendedDataset`` mixes
    exactly ``n`` of them in proportion to the weights (``n = None``, one epoch, needs a single
    prefix).
    """

    datasets, weights = _open_blend(data_path, mmap)
    bounds = [parse_split(split, ds.num_documents) for ds in datasets]
    options = dict(
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        eod_token=eod_token,
    )
    return tuple(
        _split_dataset(datasets, weights, [np.arange(b[i], b[i + 1]) for b in bounds], name,
                       train_valid_test_num_samples[i], seq_length, seed, cache_dir, options)
        for i, name in enumerate(SPLIT_NAMES))


def build_split_path_datasets(
    split_paths: Sequence[Sequence[str]],
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: Sequence[int | None],
    cache_dir: str | None = None,
    mmap: bool = True,
    **options,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """Train, valid and test datasets from their own prefixes (Megatron core's
    ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``): each prefix (or
    weighted blend) is used whole by its split; a split without paths is ``None``."""
    result: list[torch.utils.data.Dataset | None] = []
    for i, name in enumerate(SPLIT_NAMES):
        if not split_paths[i]:
            result.append(None)
            continue
        datasets, weights = _open_blend(split_paths[i], mmap)
        ranges = [np.arange(ds.num_documents) for ds in datasets]
        result.append(_split_dataset(datasets, weights, ranges, name,
                                     train_valid_test_num_samples[i], seq_length, seed,
                                     cache_dir, options))
    return tuple(result)


def _open_blend(data_path: Sequence[str], mmap: bool = True
                ) -> tuple[list[IndexedDataset], list[float]]:
    """The indexed datasets of a (weighted) prefix list and their normalised weights."""
    blend = parse_data_path(data_path)
    total_weight = sum(w for w, _ in blend)
    datasets = []
    for _, prefix in blend:
        ds = IndexedDataset(prefix, mmap=mmap)
        if ds.num_documents == 0:
            raise ValueError(f"{prefix}: empty dataset (no documents)")
        if ds.num_documents != len(ds):
            raise ValueError(f"{prefix}: GPT data needs one sequence per document")
        datasets.append(ds)
    return datasets, [w / total_weight for w, _ in blend]


def _split_dataset(datasets, weights, ranges, name, num_samples, seq_length, seed, cache_dir,
                   options) -> torch.utils.data.Dataset | None:
    """One split over the given documents of each dataset: a GPTDataset, or a BlendedDataset
    of the parts in proportion to the weights; None when empty or no samples are wanted."""
    from megatron_selfroute.data.blended import BlendedDataset  # blended imports this module

    if num_samples == 0 or all(r.size == 0 for r in ranges):
        return None
    if len(datasets) == 1:
        return GPTDataset(datasets[0], ranges[0], num_samples, seq_length, seed, cache_dir, name,
                          **options)
    if num_samples is None:
        raise ValueError(f"split {name!r}: a blend needs an explicit number of samples")
    parts = []
    for ds, docs, weight in zip(datasets, ranges, weights, strict=True):
        if docs.size == 0:
            raise ValueError(f"{ds.prefix} split {name!r}: no documents for a blended split")
        size = int(math.ceil(math.ceil(num_samples * weight) * (1 + BLEND_SURPLUS)))
        parts.append(GPTDataset(ds, docs, size, seq_length, seed, cache_dir, name, **options))
    blend_cache = cache_dir or default_cache_dir(datasets[0].prefix)
    return BlendedDataset(parts, weights, num_samples, seed, cache_dir=blend_cache)
