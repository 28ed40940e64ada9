#!/usr/bin/env python
"""Tokenize documents into Megatron-LM ``MMIDIDX`` pairs: ``{prefix}_{key}_document.{bin,idx}``.

Flags follow Megatron-LM's ``tools/preprocess_data.py``. Inputs are files (globs allowed):

- ``.jsonl`` (and any other extension): one JSON object per line, blank lines ignored;
- ``.json``: a JSON array of objects, or JSON lines;
- ``.txt``: the whole file is ONE document (so a corpus of many text files keeps its documents),
  or one document per non-empty line with ``--txt-split-lines``; the text fills the only key.

or a Hugging Face dataset (``--hf-dataset``): a hub name such as ``openwebtext``, a local data
directory, or a directory written by ``save_to_disk``. ``--hf-val-size`` applies nanoGPT's
held-out split (``train_test_split(test_size, seed, shuffle=True)``, ``test`` renamed ``val``)
and ``--hf-keep`` picks the side to write.

Output is byte-identical for any ``--workers``: documents are tokenized in ordered chunks.
Everything is written under temporary names and renamed into place only after the whole run
succeeded, so a failed or interrupted run leaves no output pair and existing outputs untouched.
Errors are one line on stderr (``file:line: reason`` for bad input) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from itertools import chain

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_selfroute.cli import first_line  # noqa: E402
from megatron_selfroute.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    optimal_dtype,
)
from megatron_selfroute.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

CHUNK_DOCS = 128
CHUNK_CHARS = 1 << 18
HF_BATCH = 1000

Document = tuple[str, list[str]]  # (location for errors, one text per json key)


class InputError(Exception):
    """A problem with the command line's inputs or outputs, reported as one line."""


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (Megatron-LM's flags plus the input options documented above)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH", help="files or globs")
    src.add_argument("--hf-dataset", metavar="NAME_OR_DIR", help="Hugging Face dataset")
    g.add_argument("--hf-split", default="train", help="dataset split to read (default train)")
    g.add_argument("--hf-streaming", action="store_true", help="stream instead of download")
    g.add_argument("--hf-val-size", type=float, help="hold out this fraction as 'val'")
    g.add_argument("--hf-val-seed", type=int, default=2357, help="held-out split seed")
    g.add_argument(
        "--hf-keep",
        choices=("train", "val"),
        default="train",
        help="side of the held-out split to write",
    )
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    g.add_argument(
        "--txt-split-lines",
        action="store_true",
        help=".txt inputs: one document per non-empty line",
    )
    g.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip (and count) malformed lines instead of failing",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT-2 encoder.json")
    g.add_argument("--merge-file", help="GPT-2 vocab.bpe")
    g.add_argument("--tokenizer-model", help=".tiktoken, SentencePiece .model or HF directory")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action="store_true", help="append eod after each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.*")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=10000, help="log every N documents")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.log_interval < 1:
        p.error("--log-interval must be >= 1")
    if args.hf_val_size is not None and not 0 < args.hf_val_size < 1:
        p.error("--hf-val-size must be in (0, 1)")
    return args


# ---------------------------------------------------------------------------------- reading


class DocumentSource:
    """Yields ``(raw_bytes, document)`` from the inputs; counts skipped malformed lines."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.keys = list(args.json_keys)
        self.skipped = 0
        self.first_skip: str | None = None
        self.total_bytes: int | None = None
        if args.input is not None:
            self.paths = expand_inputs(args.input)
            self.total_bytes = sum(os.path.getsize(p) for p in self.paths)
            if any(p.endswith(".txt") for p in self.paths) and len(self.keys) != 1:
                raise InputError(".txt inputs need exactly one --json-keys key")

    def __iter__(self) -> Iterator[tuple[int, Document]]:
        if self.args.input is None:
            yield from self._hf_documents()
            return
        for path in self.paths:
            if path.endswith(".txt"):
                yield from self._txt_documents(path)
            elif path.endswith(".json") and _starts_with_bracket(path):
                yield from self._json_array_documents(path)
            else:
                yield from self._jsonl_documents(path)

    def _bad(self, message: str) -> None:
        """Fail on a malformed line, or count it under ``--skip-bad-lines``."""
        if not self.args.skip_bad_lines:
            raise InputError(message)
        self.skipped += 1
        self.first_skip = self.first_skip or message

    def _texts(self, obj: object, loc: str) -> list[str] | None:
        """The texts of ``obj`` under the json keys, or None (after ``_bad``) if malformed."""
        if not isinstance(obj, dict):
            self._bad(f"{loc}: expected a JSON object, got {type(obj).__name__}")
            return None
        texts = []
        for key in self.keys:
            if key not in obj:
                self._bad(f"{loc}: missing key {key!r}")
                return None
            if not isinstance(obj[key], str):
                self._bad(f"{loc}: key {key!r} is {type(obj[key]).__name__}, not a string")
                return None
            texts.append(obj[key])
        return texts

    def _jsonl_documents(self, path: str) -> Iterator[tuple[int, Document]]:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    self._bad(f"{loc}: invalid JSON ({getattr(e, 'msg', e)})")
                    continue
                texts = self._texts(obj, loc)
                if texts is not None:
                    yield len(line), (loc, texts)

    def _json_array_documents(self, path: str) -> Iterator[tuple[int, Document]]:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            items = json.loads(raw)
        except ValueError as e:
            raise InputError(f"{path}:{getattr(e, 'lineno', 1)}: invalid JSON array ({e})") from e
        per_item = len(raw) // max(len(items), 1)
        for i, obj in enumerate(items):
            texts = self._texts(obj, f"{path}: item {i}")
            if texts is not None:
                yield per_item, (f"{path}: item {i}", texts)

    def _txt_documents(self, path: str) -> Iterator[tuple[int, Document]]:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from e
        if not self.args.txt_split_lines:
            yield len(raw), (path, [text])
            return
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield len(line.encode("utf-8")) + 1, (f"{path}:{lineno}", [line])

    def _hf_documents(self) -> Iterator[tuple[int, Document]]:
        args, name = self.args, self.args.hf_dataset
        ds = load_hf_dataset(args)
        names = getattr(ds, "column_names", None)
        missing = [k for k in self.keys if names is not None and k not in names]
        if missing:
            raise InputError(f"{name}[{args.hf_split}]: missing column {missing[0]!r}")
        row = 0
        for batch in ds.iter(batch_size=HF_BATCH):
            columns = [batch.get(k) for k in self.keys]
            for j in range(len(next(iter(batch.values())))):
                loc = f"{name}[{args.hf_split}]:row {row}"
                row += 1
                obj = {k: c[j] for k, c in zip(self.keys, columns, strict=True) if c is not None}
                texts = self._texts(obj, loc)
                if texts is not None:
                    yield sum(len(t) for t in texts), (loc, texts)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs in order (sorted within a glob); every pattern must match a file."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise InputError(f"input not found: {pattern}")
        paths.extend(matches)
    return paths


def _starts_with_bracket(path: str) -> bool:
    """Whether a ``.json`` file holds a JSON array (first non-blank byte is ``[``)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def load_hf_dataset(args: argparse.Namespace) -> object:
    """Load the requested split (a save_to_disk directory, a local data dir or a hub name)."""
    import datasets

    name, split = args.hf_dataset, args.hf_split
    if args.hf_streaming and args.hf_val_size is not None:
        raise InputError("--hf-val-size needs a non-streaming dataset (drop --hf-streaming)")
    saved = ("dataset_dict.json", "dataset_info.json", "state.json")
    try:
        if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in saved):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"{name}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            if args.hf_streaming:
                ds = ds.to_iterable_dataset()
        else:
            extra = {} if args.hf_streaming else {"num_proc": args.workers}
            ds = datasets.load_dataset(name, split=split, streaming=args.hf_streaming, **extra)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot load"
        reason = first_line(e)
        raise InputError(
            f"cannot load Hugging Face dataset {name!r} split {split!r}: {reason}"
        ) from None
    if args.hf_val_size is not None:
        parts = ds.train_test_split(test_size=args.hf_val_size, seed=args.hf_val_seed, shuffle=True)
        ds = parts["test"] if args.hf_keep == "val" else parts["train"]
    return ds


def chunked(source: DocumentSource) -> Iterator[tuple[int, list[Document]]]:
    """Group documents into chunks of at most CHUNK_DOCS documents / about CHUNK_CHARS chars."""
    docs: list[Document] = []
    raw = chars = 0
    for nbytes, doc in source:
        docs.append(doc)
        raw += nbytes
        chars += sum(len(t) for t in doc[1])
        if len(docs) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield raw, docs
            docs, raw, chars = [], 0, 0
    if docs:
        yield raw, docs


# --------------------------------------------------------------------------------- encoding

_WORKER: dict = {}


def init_worker(tokenizer_kwargs: dict, append_eod: bool) -> None:
    """Build the tokenizer once per process (inherited as-is by forked workers)."""
    if _WORKER.get("kwargs") != tokenizer_kwargs:
        tokenizer = build_tokenizer(**tokenizer_kwargs)
        _WORKER.update(
            kwargs=tokenizer_kwargs, tokenizer=tokenizer, dtype=optimal_dtype(tokenizer.vocab_size)
        )
    _WORKER["append_eod"] = append_eod


def init_pool_worker(tokenizer_kwargs: dict, append_eod: bool) -> None:
    """A pool worker ignores Ctrl-C: the parent handles it, and the chunks already handed out
    still finish, so closing the pool never waits on a chunk whose worker died."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(tokenizer_kwargs, append_eod)


def encode_chunk(docs: list[Document]) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Tokenize a chunk: returns (UTF-8 bytes of text, per key (tokens, lengths))."""
    tokenizer, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    eod = [tokenizer.eod] if _WORKER["append_eod"] else []
    nbytes = 0
    per_key = []
    for k in range(len(docs[0][1])):
        pieces = []
        for loc, texts in docs:
            nbytes += len(texts[k].encode("utf-8"))
            try:
                pieces.append(tokenizer.tokenize(texts[k]) + eod)
            except ValueError as e:
                raise InputError(f"{loc}: {e}") from None
        lengths = np.fromiter(map(len, pieces), dtype=np.int32, count=len(pieces))
        tokens = np.fromiter(chain.from_iterable(pieces), dtype=dtype, count=int(lengths.sum()))
        per_key.append((tokens, lengths))
    return nbytes, per_key


def encoded_chunks(
    chunks: Iterator[tuple[int, list[Document]]], workers: int, init_args: tuple
) -> Iterator[tuple[int, int, list[tuple[np.ndarray, np.ndarray]]]]:
    """Yield ``(raw_bytes, text_bytes, per_key)`` per chunk, in input order.

    With several workers a Pool tokenizes at most ``2 * workers`` chunks ahead of the writer,
    so memory stays bounded however large the input.
    """
    init_worker(*init_args)
    if workers == 1:
        for raw, docs in chunks:
            yield (raw, *encode_chunk(docs))
        return
    pool = multiprocessing.Pool(workers, initializer=init_pool_worker, initargs=init_args)
    try:
        pending: deque = deque()
        for raw, docs in chunks:
            pending.append((raw, pool.apply_async(encode_chunk, (docs,))))
            if len(pending) >= 2 * workers:
                raw_done, result = pending.popleft()
                yield (raw_done, *result.get())
        while pending:
            raw_done, result = pending.popleft()
            yield (raw_done, *result.get())
    finally:
        # close + join, also on bad input: `with Pool` would call terminate(), which can deadlock
        # on the task queue's lock (seen once: an invalid line, then a hang instead of the error
        # line). At most 2 x workers chunks are still in flight, so this returns promptly.
        pool.close()
        pool.join()


# ---------------------------------------------------------------------------------- writing


class Outputs:
    """One builder per key, writing to temporary names until ``commit``."""

    def __init__(self, output_prefix: str, keys: list[str], dtype: type[np.number]) -> None:
        directory = os.path.dirname(os.path.abspath(output_prefix))
        if not os.path.isdir(directory):
            raise InputError(f"output directory does not exist: {directory}")
        self.prefixes = [f"{output_prefix}_{key}_document" for key in keys]
        suffix = f".tmp-{os.getpid()}"
        self.temporary = [
            (data_file_path(p) + suffix, index_file_path(p) + suffix) for p in self.prefixes
        ]
        self.builders: list[IndexedDatasetBuilder] = []
        self.created: list[str] = []  # only these temporary files are ours to delete
        for bin_tmp, _ in self.temporary:
            try:
                self.builders.append(IndexedDatasetBuilder(bin_tmp, dtype))
            except OSError as e:
                self.discard()
                raise InputError(f"cannot write output {bin_tmp}: {e.strerror}") from None
            self.created.append(bin_tmp)

    def commit(self) -> None:
        """Write the indices, then rename every file to its final name (bins, then idxs)."""
        for builder, (_, idx_tmp) in zip(self.builders, self.temporary, strict=True):
            self.created.append(idx_tmp)
            try:
                builder.finalize(idx_tmp)
            except OSError as e:
                raise InputError(f"cannot write output {idx_tmp}: {e.strerror}") from None
        for prefix, (bin_tmp, _) in zip(self.prefixes, self.temporary, strict=True):
            os.replace(bin_tmp, data_file_path(prefix))
        for prefix, (_, idx_tmp) in zip(self.prefixes, self.temporary, strict=True):
            os.replace(idx_tmp, index_file_path(prefix))
        self.created = []

    def discard(self) -> None:
        """Close and delete the temporary files this run created."""
        for builder in self.builders:
            builder.close()
        for path in self.created:
            if os.path.isfile(path):
                os.remove(path)
        self.created = []


def run(args: argparse.Namespace) -> None:
    """Tokenize every document and write the outputs (raises InputError on bad input)."""
    tokenizer_kwargs = dict(
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )
    try:
        tokenizer = build_tokenizer(**tokenizer_kwargs)
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    source = DocumentSource(args)
    outputs = Outputs(args.output_prefix, source.keys, optimal_dtype(tokenizer.vocab_size))
    start = time.time()
    docs = tokens = text_bytes = 0
    next_log = args.log_interval
    try:
        with tqdm(
            total=source.total_bytes,
            unit="B",
            unit_scale=True,
            disable=None,
            desc="tokenizing",
            file=sys.stderr,
        ) as bar:
            chunks = encoded_chunks(
                chunked(source), args.workers, (tokenizer_kwargs, args.append_eod)
            )
            for raw, nbytes, per_key in chunks:
                for builder, (chunk_tokens, lengths) in zip(outputs.builders, per_key, strict=True):
                    builder.add_documents(chunk_tokens, lengths)
                    tokens += chunk_tokens.size
                docs += per_key[0][1].size
                text_bytes += nbytes
                bar.update(raw)
                if docs >= next_log:
                    mbs = text_bytes / 1e6 / max(time.time() - start, 1e-9)
                    print(f"processed {docs} documents ({mbs:.2f} MB/s)", file=sys.stderr)
                    next_log = (docs // args.log_interval + 1) * args.log_interval
        if docs == 0:
            raise InputError(f"no documents in input: {' '.join(args.input or [args.hf_dataset])}")
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    elapsed = max(time.time() - start, 1e-9)
    skipped = ""
    if source.skipped:
        skipped = f", skipped {source.skipped} bad lines (first: {source.first_skip})"
    print(
        f"done: {docs} documents, {tokens} tokens, {text_bytes / 1e6:.2f} MB in {elapsed:.2f} s "
        f"({text_bytes / 1e6 / elapsed:.2f} MB/s){skipped}; wrote "
        + ", ".join(f"{p}.bin/.idx" for p in outputs.prefixes)
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point; callable in-process. Failures exit non-zero with one line on stderr."""
    args = get_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("preprocess_data: interrupted; no output written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
