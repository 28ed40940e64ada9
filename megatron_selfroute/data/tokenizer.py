"""Tokenizers with one small interface: ``vocab_size``, ``eod``, ``tokenize`` and ``detokenize``.

The names and flags follow Megatron-LM (``--tokenizer-type``, ``--vocab-file``, ``--merge-file``,
``--tokenizer-model``, ``--vocab-size``) so that preprocessing and training scripts read alike.

Documents are separated in the token stream only by the ``eod`` id that preprocessing appends.
Every tokenizer here therefore encodes a special-token string that occurs *inside* a document
(for example a literal ``<|endoftext|>`` in scraped web text) as ordinary text; otherwise
untrusted text could forge document boundaries.

Everything works offline: the GPT-2 BPE files ship with the package (``assets/gpt2``) and the
tiktoken encoding is built from them directly instead of through ``tiktoken.get_encoding``,
which would try to download.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
GPT2_TIKTOKEN_FILE = os.path.join(ASSETS_DIR, "gpt2", "gpt2.tiktoken")
GPT2_VOCAB_FILE = os.path.join(ASSETS_DIR, "gpt2", "encoder.json")
GPT2_MERGE_FILE = os.path.join(ASSETS_DIR, "gpt2", "vocab.bpe")
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


class Tokenizer(ABC):
    """Common interface of every tokenizer used by preprocessing and training."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before any padding for parallelism)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id: appended after each document, never produced from text."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Encode ``text``; special-token strings inside it are encoded as ordinary text."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ``ids`` back to text."""


def _require_file(path: str, what: str) -> None:
    """Raise a one-line FileNotFoundError naming ``path`` when it is not a regular file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def _reason(error: Exception) -> str:
    """First line of an exception's message, to keep errors on one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used in encoder.json / vocab.bpe."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` rank file (``base64(token) rank`` per line) with clear errors."""
    _require_file(path, "tiktoken BPE file")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken BPE rank line") from e
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken BPE file")
    return ranks


def gpt2_bpe_ranks(vocab_file: str, merge_file: str) -> tuple[dict[bytes, int], int]:
    """Build tiktoken ranks from a GPT-2 ``encoder.json`` + ``vocab.bpe`` pair.

    tiktoken merges by rank, so this requires (and checks) that every token's id equals its
    merge priority, as in GPT-2's files. Returns the ranks and the ``<|endoftext|>`` id.
    """
    _require_file(vocab_file, "vocab file")
    _require_file(merge_file, "merge file")
    byte_decoder = {c: b for b, c in _gpt2_byte_to_unicode().items()}
    try:
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
        if not isinstance(encoder, dict):
            raise ValueError("not a JSON object")
        eod = encoder.pop(ENDOFTEXT)
        ranks = {bytes(byte_decoder[c] for c in tok): int(i) for tok, i in encoder.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{vocab_file}: not a GPT-2 encoder.json vocab file ({_reason(e)})") from e
    with open(merge_file, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n")[1:] if line]
    for i, line in enumerate(lines):
        parts = line.split(" ")
        try:
            merged = bytes(byte_decoder[c] for c in parts[0] + parts[1])
        except (KeyError, IndexError) as e:
            raise ValueError(f"{merge_file}:{i + 2}: not a GPT-2 merge line") from e
        if len(parts) != 2 or ranks.get(merged) != 256 + i:
            raise ValueError(f"{merge_file}:{i + 2}: merge does not match vocab file {vocab_file}")
    if len(ranks) != 256 + len(lines) or eod != len(ranks):
        raise ValueError(f"{vocab_file}: vocab size does not match merge file {merge_file}")
    return ranks, eod


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE backed by tiktoken.

    Sources, in order: ``tiktoken_file`` (a ``.tiktoken`` rank file), else ``vocab_file`` +
    ``merge_file`` (Megatron's ``--vocab-file``/``--merge-file``, i.e. ``encoder.json`` and
    ``vocab.bpe``), else the GPT-2 files bundled with the package. ``eod`` is
    ``<|endoftext|>`` (50256 for GPT-2). A literal ``<|endoftext|>`` in the text is encoded as
    ordinary text (tiktoken ``encode_ordinary``, i.e. ``disallowed_special=()`` with no allowed
    special tokens), so only the appended eod separates documents.
    """

    def __init__(
        self,
        vocab_file: str | None = None,
        merge_file: str | None = None,
        tiktoken_file: str | None = None,
    ) -> None:
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str

        if tiktoken_file is not None:
            ranks = load_tiktoken_ranks(tiktoken_file)
            eod = len(ranks)
        elif vocab_file is not None or merge_file is not None:
            if vocab_file is None or merge_file is None:
                raise ValueError("GPT2BPETokenizer needs both --vocab-file and --merge-file")
            ranks, eod = gpt2_bpe_ranks(vocab_file, merge_file)
        else:
            ranks = load_tiktoken_ranks(GPT2_TIKTOKEN_FILE)
            eod = len(ranks)
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: eod},
            explicit_n_vocab=eod + 1,
        )
        self._eod = eod

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; ``eod`` is the model's ``</s>`` (eos) id.

    SentencePiece never turns control symbols written in the text into their ids, so a literal
    ``</s>`` inside a document stays ordinary text.
    """

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        _require_file(model_file, "SentencePiece model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a SentencePiece model ({_reason(e)})") from e
        if self._sp.eos_id() < 0:
            raise ValueError(f"{model_file}: SentencePiece model has no eos (</s>) piece")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (``save_pretrained`` output), loaded offline.

    ``eod`` is the tokenizer's eos id and ``vocab_size`` counts added tokens too. Text is encoded
    without added special tokens and with ``split_special_tokens=True``, so special-token strings
    in a document are encoded as ordinary text.
    """

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Hugging Face tokenizer directory not found: {path}")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: cannot load Hugging Face tokenizer ({_reason(e)})") from e
        if self._tok.eos_token_id is None:
            raise ValueError(f"{path}: Hugging Face tokenizer has no eos token")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return int(self._tok.eos_token_id)

    def tokenize(self, text: str) -> list[int]:
        out = self._tok(text, add_special_tokens=False, split_special_tokens=True)
        return list(out["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class NullTokenizer(Tokenizer):
    """Text is already ids, separated by whitespace (Megatron's ``NullTokenizer``).

    As in Megatron, ``--vocab-size N`` gives ids ``0..N-1`` for text, ``eod = N`` and
    ``vocab_size = N + 1`` (so ``eod == vocab_size - 1``).
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError("NullTokenizer needs a positive --vocab-size")
        self._n = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    def tokenize(self, text: str) -> list[int]:
        ids = [int(x) for x in text.split()]
        bad = [i for i in ids if not 0 <= i < self._n]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} outside [0, {self._n})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron-style flags.

    ``GPT2BPETokenizer`` uses ``vocab_file`` + ``merge_file``, or a ``.tiktoken`` file passed as
    ``tokenizer_model``, or the bundled GPT-2 files; ``SentencePieceTokenizer`` (alias
    ``GPTSentencePieceTokenizer``) a ``.model`` file; ``HuggingFaceTokenizer`` a local tokenizer
    directory; ``NullTokenizer`` only ``vocab_size``.
    """
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, tiktoken_file=tokenizer_model)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if tokenizer_model is None:
            raise ValueError(f"{tokenizer_type} needs --tokenizer-model (a .model file)")
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (a local directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
    )
