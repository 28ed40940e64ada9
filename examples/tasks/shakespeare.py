"""lm-eval dataset loader for the local Shakespeare tasks in this directory.

The task YAMLs name `shakespeare.load` as their `custom_dataset`, so the jsonl files are found
beside this file whatever the working directory (a `data_files` path in a YAML would be resolved
against the working directory instead). No network, no Hugging Face cache.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, **_metadata):
    """{"test": Dataset} from DATA/data_file (lm-eval passes the YAML's dataset_kwargs here)."""
    import datasets

    with open(DATA / data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
