"""tools/preprocess_data.py, run in-process: contents, determinism across workers, input formats,
Hugging Face datasets, and every bad-input path by its one-line message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megatron_selfroute.data.corpus import text_to_jsonl
from megatron_selfroute.data.indexed_dataset import IndexedDataset

from .conftest import CORPUS, REPO

GPT2 = ["--tokenizer-type", "GPT2BPETokenizer"]
SPECIAL = "ends <|endoftext|> mid-document, café ☃"


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def documents(prefix: str) -> list[list[int]]:
    return [d.tolist() for d in IndexedDataset(prefix)]


def expected(gpt2, texts, eod=True) -> list[list[int]]:
    return [gpt2.tokenize(t) + ([gpt2.eod] if eod else []) for t in texts]


def test_jsonl_round_trip_and_summary(tmp_path, preprocess, gpt2, corpus_docs, capsys):
    texts = corpus_docs[:30] + [SPECIAL, ""]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    out = str(tmp_path / "out")
    preprocess.main(["--input", src, "--output-prefix", out, *GPT2, "--append-eod"])
    got = documents(out + "_text_document")
    assert got == expected(gpt2, texts)
    assert gpt2.eod not in got[30][:-1]  # the literal <|endoftext|> stayed text
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"done: {len(texts)} documents, {sum(map(len, got))} tokens")
    assert "MB/s" in summary
    assert sorted(os.listdir(tmp_path)) == [
        "in.jsonl",
        "out_text_document.bin",
        "out_text_document.idx",
    ]


def test_one_and_two_workers_byte_identical(tmp_path, preprocess, corpus_text):
    (tmp_path / "c.txt").write_text(corpus_text)
    src = str(tmp_path / "c.jsonl")
    n = text_to_jsonl(str(tmp_path / "c.txt"), src, lines_per_doc=5)
    assert n > 4 * preprocess.CHUNK_DOCS  # several chunks in flight
    outs = []
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        preprocess.main(
            [
                "--input",
                src,
                "--output-prefix",
                out,
                *GPT2,
                "--append-eod",
                "--workers",
                str(workers),
            ]
        )
        outs.append(out + "_text_document")
    for ext in (".bin", ".idx"):
        assert open(outs[0] + ext, "rb").read() == open(outs[1] + ext, "rb").read()
    assert len(IndexedDataset(outs[0])) == n


def test_input_formats_and_keys(tmp_path, preprocess, gpt2, corpus_docs):
    a, b, c = corpus_docs[:3]
    (tmp_path / "arr.json").write_text(
        json.dumps([{"text": a, "title": "A"}, {"text": b, "title": "B"}])
    )
    write_jsonl(tmp_path / "lines.json", [{"text": c, "title": "C"}])
    out = str(tmp_path / "j")
    preprocess.main(
        [
            "--input",
            str(tmp_path / "*.json"),
            "--output-prefix",
            out,
            *GPT2,
            "--json-keys",
            "text",
            "title",
        ]
    )
    assert documents(out + "_text_document") == expected(gpt2, [a, b, c], eod=False)
    assert documents(out + "_title_document") == expected(gpt2, ["A", "B", "C"], eod=False)

    (tmp_path / "one.txt").write_text(a)
    (tmp_path / "two.txt").write_text("line one\n\nline two\n")
    txt = [str(tmp_path / "one.txt"), str(tmp_path / "two.txt")]
    preprocess.main(
        ["--input", *txt, "--output-prefix", str(tmp_path / "t"), *GPT2, "--append-eod"]
    )
    assert documents(str(tmp_path / "t_text_document")) == expected(
        gpt2, [a, "line one\n\nline two\n"]
    )
    preprocess.main(
        ["--input", txt[1], "--output-prefix", str(tmp_path / "s"), *GPT2, "--txt-split-lines"]
    )
    assert documents(str(tmp_path / "s_text_document")) == expected(
        gpt2, ["line one", "line two"], eod=False
    )


def test_huggingface_dataset_and_nanogpt_holdout(tmp_path, preprocess, gpt2, corpus_docs):
    import datasets

    texts = corpus_docs[:40]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(40))})
    ds.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": ds, "other": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "dict")
    )
    preprocess.main(
        [
            "--hf-dataset",
            str(tmp_path / "flat"),
            "--output-prefix",
            str(tmp_path / "all"),
            *GPT2,
            "--append-eod",
        ]
    )
    assert documents(str(tmp_path / "all_text_document")) == expected(gpt2, texts)
    preprocess.main(
        [
            "--hf-dataset",
            str(tmp_path / "dict"),
            "--hf-split",
            "other",
            "--hf-streaming",
            "--output-prefix",
            str(tmp_path / "o"),
            *GPT2,
        ]
    )
    assert documents(str(tmp_path / "o_text_document")) == expected(gpt2, texts[:3], eod=False)
    reference = ds.train_test_split(test_size=0.1, seed=2357, shuffle=True)
    for side, split in (("val", "test"), ("train", "train")):
        out = str(tmp_path / side)
        preprocess.main(
            [
                "--hf-dataset",
                str(tmp_path / "dict"),
                "--hf-val-size",
                "0.1",
                "--hf-keep",
                side,
                "--output-prefix",
                out,
                *GPT2,
                "--append-eod",
            ]
        )
        assert documents(out + "_text_document") == expected(gpt2, reference[split]["text"])
    assert len(documents(str(tmp_path / "val_text_document"))) == 4


def run_failing(preprocess, capsys, *argv: str) -> str:
    """Run main, expect exit status 1 and return its single stderr line."""
    with pytest.raises(SystemExit) as exc:
        preprocess.main(list(argv))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated'], r"in.jsonl:3: invalid JSON"),
        ([{"text": "ok"}, {"body": "no text"}], r"in.jsonl:2: missing key 'text'"),
        ([{"text": 12}], r"in.jsonl:1: key 'text' is int, not a string"),
        (["[1, 2]"], r"in.jsonl:1: expected a JSON object"),
        ([], r"no documents in input"),
    ],
)
def test_bad_input_lines(tmp_path, preprocess, capsys, rows, message):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    line = run_failing(
        preprocess, capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), *GPT2
    )
    assert line.startswith("preprocess_data: error: ")
    assert re.search(message, line), line
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no outputs, no temporary files


def test_missing_inputs_outputs_and_tokenizer(tmp_path, preprocess, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}])
    out = ["--output-prefix", str(tmp_path / "o")]
    line = run_failing(preprocess, capsys, "--input", str(tmp_path / "gone.jsonl"), *out, *GPT2)
    assert line.endswith("input not found: " + str(tmp_path / "gone.jsonl"))
    line = run_failing(preprocess, capsys, "--input", str(tmp_path / "*.none"), *out, *GPT2)
    assert "input not found" in line
    line = run_failing(
        preprocess, capsys, "--input", src, "--output-prefix", str(tmp_path / "no-dir" / "o"), *GPT2
    )
    assert "output directory does not exist: " + str(tmp_path / "no-dir") in line
    line = run_failing(
        preprocess,
        capsys,
        "--input",
        src,
        "--output-prefix",
        str(tmp_path / "in.jsonl" / "o"),
        *GPT2,
    )
    assert "output directory does not exist" in line
    blocker = tmp_path / f"o_text_document.bin.tmp-{os.getpid()}"
    blocker.mkdir()  # the temporary output name is taken by a directory
    line = run_failing(preprocess, capsys, "--input", src, *out, *GPT2)
    assert "cannot write output" in line and "o_text_document.bin" in line
    assert blocker.is_dir()  # not ours: left alone
    blocker.rmdir()
    line = run_failing(
        preprocess,
        capsys,
        "--input",
        src,
        *out,
        *GPT2,
        "--vocab-file",
        str(tmp_path / "v.json"),
        "--merge-file",
        str(tmp_path / "m.bpe"),
    )
    assert line.endswith("vocab file not found: " + str(tmp_path / "v.json"))
    line = run_failing(
        preprocess, capsys, "--hf-dataset", str(tmp_path / "nothing-here"), *out, *GPT2
    )
    assert "cannot load Hugging Face dataset" in line and "nothing-here" in line


def test_failure_keeps_existing_outputs(tmp_path, preprocess, capsys, corpus_docs):
    out = str(tmp_path / "o")
    for ext in (".bin", ".idx"):
        (tmp_path / f"o_text_document{ext}").write_bytes(b"previous run" + ext.encode())
    rows = [{"text": t} for t in corpus_docs] * 8 + ["not json"]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    line = run_failing(
        preprocess, capsys, "--input", src, "--output-prefix", out, *GPT2, "--workers", "2"
    )
    assert f"in.jsonl:{len(rows)}: invalid JSON" in line
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"o_text_document{ext}").read_bytes() == b"previous run" + ext.encode()
    assert sorted(os.listdir(tmp_path)) == [
        "in.jsonl",
        "o_text_document.bin",
        "o_text_document.idx",
    ]


def test_skip_bad_lines_counts_them(tmp_path, preprocess, capsys, gpt2):
    rows = [{"text": "a"}, "{oops", {"text": "b"}, {"x": 1}, {"text": "c"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "o")
    preprocess.main(["--input", src, "--output-prefix", out, *GPT2, "--skip-bad-lines"])
    assert documents(out + "_text_document") == expected(gpt2, ["a", "b", "c"], eod=False)
    summary = capsys.readouterr().out
    assert "skipped 2 bad lines (first: " in summary and "in.jsonl:2: invalid JSON" in summary


def test_worker_tokenizer_error_names_the_line(tmp_path, preprocess, capsys):
    rows = [{"text": "1 2 3"}] * 300 + [{"text": "4 999"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    line = run_failing(
        preprocess,
        capsys,
        "--input",
        src,
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "100",
        "--workers",
        "2",
    )
    assert "in.jsonl:301: NullTokenizer: id 999 outside [0, 100)" in line
    out = str(tmp_path / "ok")
    preprocess.main(
        [
            "--input",
            src,
            "--output-prefix",
            out,
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "1000",
            "--append-eod",
        ]
    )
    got = documents(out + "_text_document")
    assert got[0] == [1, 2, 3, 1000] and got[-1] == [4, 999, 1000]
    assert IndexedDataset(out + "_text_document").dtype == np.uint16


def test_command_line_error_has_no_traceback(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}, "{bad"])
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            src,
            "--output-prefix",
            str(tmp_path / "o"),
            *GPT2,
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(CORPUS),
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip() == f"preprocess_data: error: {src}:2: invalid JSON (Expecting "
        "property name enclosed in double quotes)"
    )
    assert "Traceback" not in proc.stderr
