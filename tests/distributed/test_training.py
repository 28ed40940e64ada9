"""pretrain_gpt.py end to end on 2 gloo processes (EP=2): the loss falls on the real corpus for
every router, resume is bit-exact (ZeRO 0 and 2, all routers, dropout on), the engine saves experts
one file per global expert, --exit-duration-in-mins saves and stops both ranks, and gradient
accumulation equals a bigger micro-batch."""
import os

import pytest

from megatron_selfroute.moe.router import BUILTIN_ROUTERS
from tests.distributed.train_cases import MOCK, real_data, run_layout
from tests.scratch import module_dir

ROUTERS = list(BUILTIN_ROUTERS)
EP2 = ["--expert-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]


@pytest.fixture(scope="module")
def two_proc_runs(request, shakespeare_prefix):
    tmp = module_dir(request, "train2")
    data = real_data(shakespeare_prefix)
    argvs, keys = [], []
    for router in ROUTERS:  # loss falls
        argvs.append(data + EP2 + ["--router-type", router, "--zero-stage", "2",
                                   "--train-iters", "30", "--lr", "5e-3"])
        keys.append(("falls", router))
    for router in ROUTERS:  # resume: straight vs first half + resume
        for zero in ("0", "2"):
            base = data + EP2 + ["--router-type", router, "--zero-stage", zero, "--train-iters",
                                 "4", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
            ckpt = str(tmp / f"ckpt_{router}_{zero}")
            argvs += [base, base + ["--save", ckpt, "--exit-interval", "2"],
                      base + ["--load", ckpt, "--save", ckpt, "--keep-last", "1"]]
            keys += [("straight", router, zero), ("first", router, zero),
                     ("resumed", router, zero)]
    # wall-time exit: both ranks stop after the first step and save it
    argvs.append(MOCK + EP2 + ["--train-iters", "50", "--exit-duration-in-mins", "1e-9",
                               "--save", str(tmp / "ckpt_walltime")])
    keys.append(("walltime",))
    results = run_layout(tmp / "runs", 2, argvs, timeout=900)
    return dict(zip(keys, results, strict=True)), tmp


def test_exit_duration_saves_and_stops_every_rank(two_proc_runs):
    runs, tmp = two_proc_runs
    run = runs[("walltime",)]
    assert run["iteration"] == 1 and sorted(run["losses"]) == ["1"], run
    assert run["exit"] == "--exit-duration-in-mins 1e-09 reached", run
    tag = (tmp / "ckpt_walltime" / "latest_checkpointed_iteration.txt").read_text().strip()
    assert tag == "iter_0000001"


@pytest.mark.parametrize("router", ROUTERS)
def test_loss_falls_on_real_corpus(two_proc_runs, router):
    losses = two_proc_runs[0][("falls", router)]["losses"]
    first = losses["1"]
    last = sum(losses[str(i)] for i in range(26, 31)) / 5
    assert last < first - 1.5, (first, last)


@pytest.mark.parametrize("zero", ["0", "2"])
@pytest.mark.parametrize("router", ROUTERS)
def test_resume_is_bit_exact(two_proc_runs, router, zero):
    runs = two_proc_runs[0]
    straight = runs[("straight", router, zero)]["losses"]
    first = runs[("first", router, zero)]
    resumed = runs[("resumed", router, zero)]["losses"]
    assert first["iteration"] == 2 and first["exit"].startswith("--exit-interval")
    assert sorted(resumed) == ["3", "4"]
    for it in ("1", "2"):
        assert first["losses"][it] == straight[it]
    for it in ("3", "4"):
        assert resumed[it] == straight[it], (it, resumed, straight)
    assert straight["1"] != straight["4"]


def test_engine_saves_experts_per_global_id(two_proc_runs):
    ckpt = two_proc_runs[1] / "ckpt_self_2"
    tag = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    assert tag == "iter_0000004"
    files = set(os.listdir(ckpt / tag))
    for layer in range(2):
        for expert in range(4):  # EP=2: each rank saved its 2 local experts under global ids
            assert f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" in files
    assert not any(name.endswith(".tmp") for name in os.listdir(ckpt))
    assert not (ckpt / "latest").exists(), "DeepSpeed's own pointer must not be written"
    # the resumed run saved into the directory it loaded from and pruned the checkpoint it
    # resumed (--keep-last 1; also keeps this module's ten checkpoints at half the disk)
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("iter_")) == [tag]


def test_gradient_accumulation_equals_bigger_micro_batch(tmp_path):
    base = MOCK + ["--router-type", "learned", "--train-iters", "4", "--global-batch-size", "4"]
    acc, big = run_layout(tmp_path, 1, [base + ["--micro-batch-size", "2"],
                                        base + ["--micro-batch-size", "4"]])
    for it, loss in big["losses"].items():
        assert abs(acc["losses"][it] - loss) < 1e-5, (it, acc, big)
