#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py against a Hugging Face baseline on the bundled corpus.

Both sides start from the same jsonl (``data/shakespeare.txt`` cut into documents of
``--lines-per-doc`` lines), use the same GPT-2 ``encoder.json`` + ``vocab.bpe`` and the same
number of workers, append eod to every document, and are timed from the jsonl on disk to tokens:

- ours: ``preprocess_data.main`` (tiktoken, ordered worker pool, writes the ``.bin``/``.idx``);
- baseline: ``datasets.Dataset.from_json`` + ``.map(batched=True, num_proc=workers)`` with
  ``transformers.GPT2TokenizerFast`` (its output stays in Arrow; nothing Megatron-ready is written).

The best of ``--repeats`` runs is reported, with tokens/s, MB/s of text and the speedup. The token
counts of both sides must agree, which checks that they did the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_selfroute.data.corpus import text_to_jsonl  # noqa: E402
from megatron_selfroute.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_selfroute.data.tokenizer import GPT2_MERGE_FILE, GPT2_VOCAB_FILE  # noqa: E402


def load_preprocess():
    """Import tools/preprocess_data.py as a module (registered for its worker processes)."""
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module
    spec.loader.exec_module(module)
    return module


def run_ours(preprocess, jsonl: str, out_dir: str, workers: int) -> tuple[float, int]:
    """Seconds and tokens for one preprocess_data run."""
    prefix = os.path.join(out_dir, "ours")
    argv = ["--input", jsonl, "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer"]
    argv += ["--vocab-file", GPT2_VOCAB_FILE, "--merge-file", GPT2_MERGE_FILE]
    argv += ["--append-eod", "--workers", str(workers)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        preprocess.main(argv)
    elapsed = time.perf_counter() - start
    tokens = int(IndexedDataset(prefix + "_text_document").sequence_lengths.sum())
    return elapsed, tokens


def run_baseline(jsonl: str, cache_dir: str, workers: int) -> tuple[float, int]:
    """Seconds and tokens for datasets.from_json + map(GPT2TokenizerFast)."""
    import datasets
    from transformers import GPT2TokenizerFast

    datasets.disable_progress_bars()
    start = time.perf_counter()
    tokenizer = GPT2TokenizerFast(vocab=GPT2_VOCAB_FILE, merges=GPT2_MERGE_FILE)
    eos = tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    ds = datasets.Dataset.from_json(jsonl, cache_dir=cache_dir)
    mapped = ds.map(
        encode,
        batched=True,
        num_proc=workers if workers > 1 else None,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    elapsed = time.perf_counter() - start
    tokens = sum(len(x) for x in mapped["input_ids"])
    return elapsed, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=os.path.join(REPO, "data", "shakespeare.txt"))
    parser.add_argument("--lines-per-doc", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        os.environ.setdefault("HF_HOME", os.path.join(tmp, "hf"))
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        jsonl = os.path.join(tmp, "corpus.jsonl")
        documents = text_to_jsonl(args.corpus, jsonl, lines_per_doc=args.lines_per_doc)
        megabytes = os.path.getsize(args.corpus) / 1e6
        preprocess = load_preprocess()
        # All of ours first: forking after HF tokenizers ran would switch off their threading.
        ours = [run_ours(preprocess, jsonl, tmp, args.workers) for _ in range(args.repeats)]
        baseline = [
            run_baseline(jsonl, os.path.join(tmp, f"hf-cache-{i}"), args.workers)
            for i in range(args.repeats)
        ]
    (t_ours, n_ours), (t_base, n_base) = min(ours), min(baseline)
    if n_ours != n_base:
        raise SystemExit(f"token counts differ: ours {n_ours}, baseline {n_base}")
    result = {
        "corpus": args.corpus,
        "megabytes": round(megabytes, 3),
        "documents": documents,
        "tokens": n_ours,
        "workers": args.workers,
        "repeats": args.repeats,
        "ours_seconds": round(t_ours, 4),
        "ours_tokens_per_s": round(n_ours / t_ours),
        "ours_mb_per_s": round(megabytes / t_ours, 3),
        "baseline_seconds": round(t_base, 4),
        "baseline_tokens_per_s": round(n_base / t_base),
        "baseline_mb_per_s": round(megabytes / t_base, 3),
        "speedup": round(t_base / t_ours, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"corpus {args.corpus}: {megabytes:.2f} MB, {documents} documents, "
            f"{n_ours} tokens, {args.workers} workers, best of {args.repeats}"
        )
        print(
            f"preprocess_data (tiktoken)          {t_ours:7.3f} s  "
            f"{n_ours / t_ours / 1e6:6.2f} M tokens/s  {megabytes / t_ours:6.2f} MB/s"
        )
        print(
            f"datasets.map + GPT2TokenizerFast    {t_base:7.3f} s  "
            f"{n_base / t_base / 1e6:6.2f} M tokens/s  {megabytes / t_base:6.2f} MB/s"
        )
        print(f"speedup {result['speedup']:.2f}x")
    return result


if __name__ == "__main__":
    main()
