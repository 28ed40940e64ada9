"""pretrain_gpt.py as users run it: SIGTERM (as SLURM preemption sends) saves a checkpoint
that resumes exactly, TensorBoard holds every MoE layer's routing tags, bad flags fail before
any work."""
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.distributed.harness import launch_ranks
from tests.distributed.train_cases import MOCK, TINY

REPO = Path(__file__).resolve().parents[2]
ARGS = TINY + MOCK + ["--router-type", "random", "--expert-model-parallel-size", "2",
                      "--zero-stage", "2", "--micro-batch-size", "2", "--train-iters", "120",
                      "--hidden-dropout", "0.1", "--eval-interval", "50", "--eval-iters", "2"]



def wait_all(procs, timeout=300):
    return [p.wait(timeout=timeout) for p in procs]


def scalars(tb_dir, tag):
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}, acc.Tags()["scalars"]


def test_sigterm_saves_and_resumes_exactly(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ARGS + ["--exit-signal-handler"]
    argv1 = common + ["--save", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb1")]
    procs = launch_ranks(2, argv1, tmp_path / "logs1")
    log0 = tmp_path / "logs1" / "rank0.log"
    deadline = time.time() + 120
    while "iteration        5/" not in (log0.read_text() if log0.exists() else ""):
        assert time.time() < deadline, log0.read_text()
        assert all(p.poll() is None for p in procs), log0.read_text()
        time.sleep(0.2)
    for p in procs:  # SLURM sends SIGTERM to every task
        p.send_signal(signal.SIGTERM)
    assert wait_all(procs) == [0, 0], log0.read_text()[-2000:]
    text = log0.read_text()
    assert "SIGTERM received" in text
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text().strip()[5:])
    assert 5 <= stopped < 120
    # resume to the end, and an uninterrupted run for reference, both on 2 processes
    argv2 = common + ["--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb2")]
    resumed = launch_ranks(2, argv2, tmp_path / "logs2")
    straight = launch_ranks(2, ARGS + ["--tensorboard-dir", str(tmp_path / "tb3")],
                            tmp_path / "logs3")
    assert wait_all(resumed + straight) == [0, 0, 0, 0]
    ref, tags = scalars(tmp_path / "tb3", "train/lm loss")
    first, _ = scalars(tmp_path / "tb1", "train/lm loss")
    second, _ = scalars(tmp_path / "tb2", "train/lm loss")
    assert sorted(first) == list(range(1, stopped + 1))
    assert sorted(second) == list(range(stopped + 1, 121))
    for step, value in {**first, **second}.items():
        assert value == ref[step], (step, value, ref[step])
    # routing tags of every MoE layer, for training and validation
    for prefix in ("train-routing", "valid-routing"):
        for layer in range(2):
            for name in ("normalized_entropy", "max_expert_fraction", "dropped_fraction"):
                assert f"{prefix}/moe_layer_{layer}/{name}" in tags
    assert {"train/grad-norm", "train/tokens-per-sec", "valid/lm loss"} <= set(tags)


def run_cli(*argv):
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_balancing_and_cross_layer_scalars_in_tensorboard(tmp_path):
    """Issue 16's live scalars: per-layer expert bias and dead experts, cross-layer agreement."""
    tb = tmp_path / "tb"
    argv = TINY + MOCK + ["--router-type", "learned", "--moe-router-enable-expert-bias",
                          "--moe-router-score-function", "sigmoid", "--micro-batch-size", "2",
                          "--train-iters", "3", "--tensorboard-dir", str(tb)]
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rng, tags = scalars(tb, "train-routing/moe_layer_1/expert_bias_range")
    assert sorted(rng) == [1, 2, 3] and rng[3] > 0  # the bias moved
    for tag in ("train-routing/moe_layer_0/dead_experts",
                "train-routing/moe_layer_0/expert_bias_max_abs",
                "train-routing/cross_layer/identity_agreement",
                "train-routing/cross_layer/chance_agreement"):
        assert tag in tags, tags
    agree, _ = scalars(tb, "train-routing/cross_layer/identity_agreement")
    assert all(0 <= v <= 1 for v in agree.values())


def test_bad_flags_fail_before_any_work(tmp_path):
    save = tmp_path / "save"
    cases = [
        (["--num-experts", "8", "--expert-model-parallel-size", "3"],
         "--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
        (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk 5"),
        (["--hidden-size", "30", "--num-attention-heads", "4"], "does not divide"),
        (["--num-experts", "4", "--moe-router-topk", "1", "--router-type", "learned"],
         "--moe-router-pre-softmax"),
        (["--num-experts", "4", "--router-type", "sinkhorn"],
         "--router-type 'sinkhorn' is unknown"),
    ]
    for argv, needle in cases:
        r = run_cli(*TINY[:8], *argv, "--mock-data", "--train-iters", "1", "--save", str(save))
        assert r.returncode == 2, (argv, r.stderr)
        assert needle in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        assert not save.exists(), "a failed run must not create outputs"
