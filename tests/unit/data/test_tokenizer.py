"""Tokenizers: GPT-2 ids equal Hugging Face's on real text; SentencePiece, HF-directory and null
tokenizers round-trip; a literal <|endoftext|> stays text; bad files fail with one clear line."""

from __future__ import annotations

import os
import shutil

import pytest

from megatron_selfroute.data.tokenizer import (
    GPT2_MERGE_FILE,
    GPT2_TIKTOKEN_FILE,
    GPT2_VOCAB_FILE,
    GPT2BPETokenizer,
    build_tokenizer,
)

WITH_EOT = "First doc ends here.<|endoftext|>Second <|endoftext|> part, and <|endoftext| half."


def test_gpt2_known_ids_and_specials(gpt2):
    assert gpt2.tokenize("hello world") == [31373, 995]
    assert (gpt2.vocab_size, gpt2.eod) == (50257, 50256)


@pytest.mark.parametrize("source", ["bundled", "vocab+merge", "tiktoken"])
def test_gpt2_ids_equal_huggingface_on_corpus(source, corpus_docs, hf_gpt2):
    kwargs = {
        "bundled": {},
        "vocab+merge": {"vocab_file": GPT2_VOCAB_FILE, "merge_file": GPT2_MERGE_FILE},
        "tiktoken": {"tokenizer_model": GPT2_TIKTOKEN_FILE},
    }[source]
    tok = build_tokenizer("GPT2BPETokenizer", **kwargs)
    ours = [tok.tokenize(d) for d in corpus_docs]
    theirs = hf_gpt2(corpus_docs, add_special_tokens=False)["input_ids"]
    assert sum(map(len, ours)) > 50_000
    assert ours == theirs
    assert (tok.vocab_size, tok.eod) == (len(hf_gpt2), hf_gpt2.eos_token_id)


def test_literal_endoftext_is_ordinary_text(gpt2, hf_gpt2):
    ids = gpt2.tokenize(WITH_EOT)
    assert gpt2.eod not in ids
    reference = hf_gpt2(WITH_EOT, add_special_tokens=False, split_special_tokens=True)
    assert ids == reference["input_ids"]
    assert gpt2.detokenize(ids) == WITH_EOT


def test_gpt2_round_trip(gpt2, corpus_text):
    assert gpt2.detokenize(gpt2.tokenize(corpus_text)) == corpus_text


def test_sentencepiece_round_trip(tmp_path, corpus_text):
    import sentencepiece as spm

    train = tmp_path / "train.txt"
    train.write_text(corpus_text[:100_000])
    spm.SentencePieceTrainer.train(
        input=str(train),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert (tok.vocab_size, tok.eod) == (400, reference.piece_to_id("</s>"))
    lines = [line for line in corpus_text[100_000:130_000].splitlines() if line.strip()]
    for line in lines:
        ids = tok.tokenize(line)
        assert tok.eod not in ids
        assert tok.detokenize(ids) == line
    assert tok.eod not in tok.tokenize("a literal </s> inside")


def test_huggingface_directory_matches_gpt2(tmp_path, hf_gpt2, gpt2, corpus_docs):
    hf_gpt2.save_pretrained(str(tmp_path / "tok"))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    for text in corpus_docs[:20] + [WITH_EOT]:
        ids = tok.tokenize(text)
        assert ids == gpt2.tokenize(text)
        assert tok.detokenize(ids) == text


def test_null_tokenizer_follows_megatron():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod) == (101, 100)
    assert tok.tokenize("3 1 99\n4") == [3, 1, 99, 4]
    assert tok.detokenize([3, 1, 99]) == "3 1 99"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("1 100")


def test_bad_tokenizer_files_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        GPT2BPETokenizer(vocab_file=missing, merge_file=GPT2_MERGE_FILE)
    with pytest.raises(ValueError, match="both"):
        GPT2BPETokenizer(vocab_file=GPT2_VOCAB_FILE)
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("this is not base64 and rank\n")
    with pytest.raises(ValueError, match="garbage.tiktoken:1"):
        GPT2BPETokenizer(tiktoken_file=str(garbage))
    not_vocab = tmp_path / "list.json"
    not_vocab.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json"):
        GPT2BPETokenizer(vocab_file=str(not_vocab), merge_file=GPT2_MERGE_FILE)
    # Merges in another order than the vocab's ids cannot be expressed as tiktoken ranks.
    lines = open(GPT2_MERGE_FILE, encoding="utf-8").read().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    swapped = tmp_path / "swapped.bpe"
    swapped.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="swapped.bpe:2: merge does not match"):
        GPT2BPETokenizer(vocab_file=GPT2_VOCAB_FILE, merge_file=str(swapped))
    not_sp = tmp_path / "bad.model"
    shutil.copy(GPT2_VOCAB_FILE, not_sp)
    with pytest.raises(ValueError, match="bad.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(not_sp))
    with pytest.raises(FileNotFoundError, match="no-dir"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=os.path.join(tmp_path, "no-dir"))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("WordPiece")
