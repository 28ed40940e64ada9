"""Fixtures of the data-pipeline tests: a slice of the real corpus, tokenizers, tiny datasets."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
import pytest

from megatron_selfroute.data.indexed_dataset import IndexedDatasetBuilder
from megatron_selfroute.data.tokenizer import GPT2_MERGE_FILE, GPT2_VOCAB_FILE, GPT2BPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CORPUS = os.path.join(REPO, "data", "shakespeare.txt")


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 300 KB of real English text (the start of the bundled Shakespeare corpus)."""
    with open(CORPUS, encoding="utf-8") as f:
        return f.read(300_000)


@pytest.fixture(scope="session")
def corpus_docs(corpus_text: str) -> list[str]:
    """The corpus slice as documents of 40 lines each."""
    lines = corpus_text.splitlines(keepends=True)
    return ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]


@pytest.fixture(scope="session")
def gpt2() -> GPT2BPETokenizer:
    """The bundled GPT-2 tokenizer."""
    return GPT2BPETokenizer()


@pytest.fixture(scope="session")
def hf_gpt2():
    """Hugging Face's GPT-2 tokenizer built offline from the same encoder.json + vocab.bpe."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab=GPT2_VOCAB_FILE, merges=GPT2_MERGE_FILE)


@pytest.fixture(scope="session")
def preprocess() -> ModuleType:
    """tools/preprocess_data.py as a module (registered so that Pool workers can find it)."""
    name = "preprocess_data"
    if name not in sys.modules:
        path = os.path.join(REPO, "tools", "preprocess_data.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def write_dataset() -> Callable[..., str]:
    """Factory: write documents (lists of ints) as an MMIDIDX pair and return its prefix."""

    def write(prefix: str, docs: Sequence[Sequence[int]], dtype: type = np.uint16) -> str:
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
        for doc in docs:
            builder.add_document(np.asarray(doc, dtype=np.int64))
        builder.finalize(prefix + ".idx")
        return prefix

    return write
