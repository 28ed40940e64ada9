"""The training step's micro-batch path never waits for the GPU (issue 19, part 5): one
micro-batch of pretrain_gpt.py's own code (forward, loss and NaN bookkeeping on the device,
DeepSpeed backward, routing counts) at EP = 1 under `torch.cuda.set_sync_debug_mode("error")`
(step_sync_case.py, in its own process). Fails without CUDA, never skips."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent


def test_training_micro_batch_never_syncs():
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA device (these tests never skip)"
    out = subprocess.run([sys.executable, str(HERE / "step_sync_case.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "micro-batch without host sync" in out.stdout
