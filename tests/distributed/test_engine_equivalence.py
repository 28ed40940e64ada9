"""Engine level: 4 processes (EP=2, ZeRO-2, gradient clipping) equal 1 process with the same global
batch through gradient accumulation, for several steps."""
import pytest

from tests.distributed import train_cases
from tests.distributed.train_cases import MOCK


def run_layout(tmp_path, world, argvs):
    return [r["losses"] for r in train_cases.run_layout(tmp_path, world, argvs)]


COMMON = MOCK + ["--micro-batch-size", "2", "--global-batch-size", "8",
          "--train-iters", "6", "--clip-grad", "0.05", "--hidden-dropout", "0",
          "--attention-dropout", "0"]


@pytest.mark.parametrize("router", ["learned"])
def test_four_processes_ep2_zero2_equal_one_process(tmp_path, router):
    args = COMMON + ["--router-type", router]
    four = run_layout(tmp_path / "w4", 4, [args + ["--expert-model-parallel-size", "2",
                                                   "--zero-stage", "2"],
                                           args + ["--expert-model-parallel-size", "2",
                                                   "--zero-stage", "0"]])
    one = run_layout(tmp_path / "w1", 1, [args + ["--zero-stage", "0"]])[0]
    assert len(one) == 6
    for losses in four:
        for it, loss in one.items():
            assert abs(losses[it] - loss) < 2e-5 * max(1.0, abs(loss)), (it, losses, one)
    # the clip was active (otherwise this test would not cover clipping)
    assert one["1"] != one["6"]
