"""Turn a plain-text corpus into the jsonl documents that ``tools/preprocess_data.py`` reads.

Used by ``examples/data/prepare_shakespeare.sh`` and the preprocessing benchmark:
``python -m megatron_selfroute.data.corpus data/shakespeare.txt out.jsonl --lines-per-doc 100``.
"""

from __future__ import annotations

import argparse
import json


def text_to_jsonl(txt: str, out_jsonl: str, lines_per_doc: int = 100, key: str = "text") -> int:
    """Write ``txt`` as jsonl, one ``{key: text}`` document per ``lines_per_doc`` lines.

    Lines keep their newlines, so concatenating the documents gives back the file except for
    whitespace-only chunks, which are dropped. Returns the number of documents written.
    """
    if lines_per_doc <= 0:
        raise ValueError(f"lines_per_doc must be positive, got {lines_per_doc}")
    with open(txt, encoding="utf-8") as f:
        lines = f.readlines()
    count = 0
    with open(out_jsonl, "w", encoding="utf-8") as out:
        for start in range(0, len(lines), lines_per_doc):
            text = "".join(lines[start : start + lines_per_doc])
            if text.strip():
                out.write(json.dumps({key: text}) + "\n")
                count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    """Command line: ``TXT OUT_JSONL [--lines-per-doc N] [--key text]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("txt")
    parser.add_argument("out_jsonl")
    parser.add_argument("--lines-per-doc", type=int, default=100)
    parser.add_argument("--key", default="text")
    args = parser.parse_args(argv)
    n = text_to_jsonl(args.txt, args.out_jsonl, args.lines_per_doc, args.key)
    print(f"wrote {n} documents to {args.out_jsonl}")


if __name__ == "__main__":
    main()
