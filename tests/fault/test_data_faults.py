"""Data faults during a run: the .bin truncated under a running job (memory-mapped and
positioned reads) is named (file, document, offset) in one line, and a data loader worker killed
mid-run ends the job with one line instead of a hang. Opening a .bin shorter than its .idx is in
tests/bad_inputs (`truncated_bin`)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.bad_inputs.runner import write_tokens
from tests.distributed.train_cases import TINY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    return write_tokens(tmp_path / "corpus", [list(rng.integers(0, 120, 300)) for _ in range(400)])


def start(prefix, tmp_path, extra=()):
    argv = TINY + ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size",
                   "127", "--split", "98,2,0", "--micro-batch-size", "2", "--train-iters",
                   "100000", "--num-workers", "1", *extra]
    log = open(tmp_path / "run.log", "w")
    p = subprocess.Popen([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO, stdout=log,
                         stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while "iteration        3/" not in (tmp_path / "run.log").read_text():
        assert p.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()
        time.sleep(0.1)
    return p


def finish(p, timeout=60):
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the run hung after the fault") from None
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert p.returncode not in (0, None), err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "pread"])
def test_bin_truncated_while_training_is_named(corpus, tmp_path, mmap):
    p = start(corpus, tmp_path, () if mmap else ("--no-mmap-bin-files",))
    with open(corpus + ".bin", "r+b") as f:
        f.truncate(2000)
    line = finish(p)
    assert f"{corpus}.bin: document " in line and ", bytes " in line, line
    assert ("beyond the end of the file (2000 bytes now" in line if mmap
            else "the file is shorter than its index says" in line), line


def test_killed_loader_worker_ends_the_job(corpus, tmp_path):
    p = start(corpus, tmp_path)
    workers = psutil.Process(p.pid).children()
    assert workers, "no data loader worker process"
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    line = finish(p)
    assert "a data loader worker died" in line, line
