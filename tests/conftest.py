"""Test-wide environment: offline hubs, a temporary HF_HOME, DeepSpeed on CPU without JIT ops."""
import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="msr_test_home_")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_TMP, "hf"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(_TMP, "tiktoken"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
