"""Crash safety: a 2-process training run (EP=2, ZeRO-2, dropout, a checkpoint every step) is
killed with SIGKILL at random moments -- half of the kills aimed inside checkpoint saves -- and
relaunched with --load until it finishes; its final losses and weights equal an uninterrupted
run's exactly."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_selfroute.checkpoint.safe_load import safe_globals
from tests.distributed.harness import launch_ranks
from tests.distributed.train_cases import MOCK, TINY

REPO = Path(__file__).resolve().parents[2]
ITERS = 12
KILLS_DURING_SAVE: list = []
ARGS = TINY + MOCK + ["--router-type", "self", "--expert-model-parallel-size", "2",
                      "--zero-stage", "2", "--micro-batch-size", "2", "--train-iters", str(ITERS),
                      "--hidden-dropout", "0.1", "--save-interval", "1"]



def tb_losses(tb_dir):
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/lm loss" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("train/lm loss")}


def logged_losses(log):
    """(iteration, printed lm loss) of every step a run logged before it ended or was killed."""
    return re.findall(r"iteration +(\d+)/ +\d+ .*?\| lm loss (\S+) \|", log.read_text())


def final_weights(ckpt):
    tag = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    out = {}
    with torch.serialization.safe_globals(safe_globals()):
        for f in sorted((ckpt / tag).glob("*model_states.pt")):
            sd = torch.load(f, weights_only=True)
            sd = sd.get("module", sd)  # expert files hold the expert's tensors directly
            out.update({f"{f.name}:{k}": v for k, v in sd.items()})
    return tag, out


def run_with_kills(tmp, rng, max_kills):
    ckpt = tmp / "ckpt"
    kills, attempt = 0, 0
    while True:
        attempt += 1
        log_dir = tmp / f"attempt{attempt}"
        argv = ARGS + ["--save", str(ckpt), "--load", str(ckpt), "--tensorboard-dir",
                       str(tmp / f"tb{attempt}")]
        procs = launch_ranks(2, argv, log_dir)
        if kills < max_kills:
            log0 = log_dir / "rank0.log"
            deadline = time.time() + 120
            while "saved checkpoint" not in (log0.read_text() if log0.exists() else ""):
                if any(p.poll() is not None for p in procs) or time.time() > deadline:
                    break
                time.sleep(0.05)
            if rng.random() < 0.5:  # a random moment (a save takes ~7 of every ~60 ms here)
                time.sleep(rng.uniform(0.0, 0.6))
            else:  # aim inside a save: wait for a checkpoint's .tmp directory to appear
                while not any(ckpt.glob("iter_*.tmp")) and time.time() < deadline:
                    if any(p.poll() is not None for p in procs):
                        break
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.004))
            if all(p.poll() is None for p in procs):
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                for p in procs:
                    p.wait()
                kills += 1
                if any(ckpt.glob("*.tmp")):  # the kill interrupted a checkpoint save
                    KILLS_DURING_SAVE.append(log_dir)
        rcs = [p.wait(timeout=300) for p in procs]
        if rcs == [0, 0]:
            return attempt, kills
        assert attempt < max_kills + 5, f"run keeps failing: {rcs}, see {log_dir}"


def trial(tmp, seed, reference):
    rng = random.Random(seed)
    attempt, kills = run_with_kills(tmp, rng, max_kills=2)
    assert kills >= 1
    # every step any attempt ran (re-runs after a resume included) printed the reference's loss
    steps = set()
    for a in range(1, attempt + 1):
        for step, text in logged_losses(tmp / f"attempt{a}" / "rank0.log"):
            assert text == reference["printed"][int(step)], (a, step, text)
            steps.add(int(step))
    assert steps == set(range(1, ITERS + 1))
    final = tb_losses(tmp / f"tb{attempt}")
    for step, value in final.items():  # and the last attempt's exact float32 TensorBoard values
        assert value == reference["losses"][step], (step, value, reference["losses"][step])
    tag, weights = final_weights(tmp / "ckpt")
    assert tag == reference["tag"]
    assert weights.keys() == reference["weights"].keys()
    for k, v in weights.items():
        assert torch.equal(v, reference["weights"][k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    argv = ARGS + ["--save", str(tmp / "ckpt"), "--tensorboard-dir", str(tmp / "tb")]
    procs = launch_ranks(2, argv, tmp / "logs")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    tag, weights = final_weights(tmp / "ckpt")
    printed = {int(k): v for k, v in logged_losses(tmp / "logs" / "rank0.log")}
    return {"losses": tb_losses(tmp / "tb"), "printed": printed, "tag": tag, "weights": weights}


@pytest.mark.parametrize("seed", [1, 2])
def test_kill9_resume_bit_exact(tmp_path, reference, seed):
    assert sorted(reference["losses"]) == list(range(1, ITERS + 1))
    trial(tmp_path, seed, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 11))
def test_kill9_resume_bit_exact_more_trials(tmp_path, reference, seed):
    trial(tmp_path, seed, reference)


@pytest.mark.slow
def test_kill9_some_kills_hit_saves():
    """Over the 10 trials (run after them in file order), kills land inside checkpoint saves."""
    print(f"kills during a checkpoint save: {len(KILLS_DURING_SAVE)}")
    assert len(KILLS_DURING_SAVE) >= 2


def test_torchrun_max_restarts_resumes_bit_exact(tmp_path, reference):
    """Under torchrun --max-restarts, rank 1 SIGKILLed at iteration 7 makes torchrun restart
    both workers; they resume from the latest checkpoint (taking over the dead run's --save
    lease) and finish with the uninterrupted run's final weights and losses."""
    ckpt = tmp_path / "ckpt"
    torchrun = Path(sys.executable).with_name("torchrun")
    log = tmp_path / "torchrun.log"
    env = dict(os.environ, MEGATRON_SELFROUTE_KILL_AT="7@1", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        rc = subprocess.run(
            [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "2",
             "--monitor-interval", "0.5", "pretrain_gpt.py", *ARGS, "--save", str(ckpt),
             "--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400).returncode
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "resumed from" in text and "at iteration 6" in text, text[-3000:]
    assert "took over the lease on --save" in text
    assert [int(s) for s, _ in logged_losses(log)].count(7) == 1  # killed before logging 7
    tag, weights = final_weights(ckpt)
    assert tag == reference["tag"] and weights.keys() == reference["weights"].keys()
    for k, v in weights.items():
        assert torch.equal(v, reference["weights"][k]), k
    for step, text_loss in logged_losses(log):
        assert text_loss == reference["printed"][int(step)], step
