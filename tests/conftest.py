"""Test-wide environment: offline hubs, a temporary HF_HOME, DeepSpeed on CPU without JIT ops."""
import atexit
import os
import shutil
import tempfile

_TMP = tempfile.mkdtemp(prefix="msr_test_home_")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_TMP, "hf"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(_TMP, "tiktoken"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shakespeare_prefix(tmp_path_factory) -> str:
    """A real GPT-2-tokenised corpus (the first 400 KB of the bundled Shakespeare) as .bin/.idx."""
    from megatron_selfroute.data.corpus import text_to_jsonl

    d = tmp_path_factory.mktemp("corpus")
    (d / "slice.txt").write_text((REPO / "data" / "shakespeare.txt").read_text()[:400_000])
    text_to_jsonl(str(d / "slice.txt"), str(d / "slice.jsonl"), lines_per_doc=40)
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                    str(d / "slice.jsonl"), "--output-prefix", str(d / "shakespeare"),
                    "--tokenizer-type", "GPT2BPETokenizer", "--append-eod", "--workers", "1"],
                   check=True, capture_output=True)
    return str(d / "shakespeare_text_document")
