"""Issue 16 end to end on 2 gloo processes (EP=2, both ranks data-parallel): every step's
expert-bias update equals the hand rule on that step's token counts summed over micro-batches
and ranks, is skipped with a skipped step, is not changed by evaluation or activation recompute,
stays fp32 under bf16 and identical on every rank, and resumes exactly; hash tables (balanced
from the training split) are the same on every rank and equal an independent reference; the
new options resume bit-exactly with both dispatchers and ZeRO 0-2."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_selfroute.data.gpt_dataset import parse_split
from megatron_selfroute.data.indexed_dataset import IndexedDataset
from megatron_selfroute.moe.router import balanced_hash_table
from tests.distributed.harness import check, spawn
from tests.distributed.train_cases import MOCK, real_data
from tests.scratch import module_dir

EP2 = ["--expert-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size",
       "4"]
BIAS = ["--router-type", "self", "--moe-router-enable-expert-bias",
        "--moe-router-bias-update-rate", "0.01"]
RATE = 0.01

RESUMED = {  # name -> flags: straight vs first half + resume
    "self-bias-bf16-z2": BIAS + ["--bf16", "--zero-stage", "2"],
    "sigmoid-bias-shared-ds-z1": ["--router-type", "learned", "--moe-router-score-function",
                                  "sigmoid", "--moe-router-enable-expert-bias",
                                  "--moe-shared-expert-intermediate-size", "24",
                                  "--moe-token-dispatcher-type", "deepspeed",
                                  "--zero-stage", "1"],
    "orthogonal-z0": ["--router-type", "fixed-random", "--fixed-random-init", "orthogonal",
                      "--zero-stage", "0"],
    "hash-balanced-z2": ["--router-type", "hash", "--hash-assignment", "balanced",
                         "--zero-stage", "2"],
}


@pytest.fixture(scope="module")
def runs(request, shakespeare_prefix):
    tmp = module_dir(request, "balancing")
    data = real_data(shakespeare_prefix)
    argvs, keys = [], []

    def add(key, argv):
        keys.append(key)
        argvs.append(argv)

    steps = ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1"]
    add("bias", data + EP2 + BIAS + steps + ["--recompute-granularity", "full", "--zero-stage",
                                              "2"])
    add("bias-plain", data + EP2 + BIAS + steps + ["--zero-stage", "2"])
    add("bias-skip", data + EP2 + BIAS + ["--train-iters", "3", "--skip-nan-steps", "1",
                                          "--test-nan-at", "2"])
    for name, flags in RESUMED.items():
        base = data + EP2 + flags + ["--train-iters", "4", "--hidden-dropout", "0.1"]
        ckpt = str(tmp / f"ckpt_{name}")
        add(("straight", name), base)
        add(("first", name), base + ["--save", ckpt, "--exit-interval", "2"])
        add(("resumed", name), base + ["--load", ckpt, "--save", ckpt])
    add("hash-shared-mock", MOCK + EP2 + ["--router-type", "hash", "--hash-assignment",
                                          "balanced", "--hash-shared", "--train-iters", "1"])
    env = {f"MSR_BAL{i}": "\x1f".join(a) for i, a in enumerate(argvs)}
    env["MSR_SAVE_TABLES"] = "1"
    names = [f"argv{i}" for i in range(len(argvs))]
    res = spawn(2, "tests.distributed.balancing_cases", names, tmp / "runs", env=env,
                timeout=900)
    return {key: check(res, n) for key, n in zip(keys, names, strict=True)}


def _rule(before, counts):
    b = torch.tensor(before, dtype=torch.float32)
    c = torch.tensor(counts, dtype=torch.float32)
    return (b + RATE * torch.sign(c.mean(-1, keepdim=True) - c)).tolist()


def test_every_step_follows_the_rule_on_the_summed_counts(runs):
    for key in ("bias", "bias-plain"):
        per_rank = runs[key]
        assert per_rank[0]["bias"] == per_rank[1]["bias"]  # identical on every rank
        for step in per_rank[0]["steps"]:
            # tokens per step: 4 samples x 16 tokens x k=2, counted once per micro-batch
            assert all(sum(row) == 4 * 16 * 2 for row in step["counts"]), step["counts"]
            assert step["after"] == _rule(step["before"], step["counts"])
            assert not step["pending_after_eval"]  # evaluation added no counts
        assert per_rank[0]["valid"], "the run must evaluate in between"
        assert any(v != 0 for row in per_rank[0]["bias"] for v in row)


def test_recompute_counts_each_micro_batch_once(runs):
    assert runs["bias"][0]["losses"] == runs["bias-plain"][0]["losses"]
    assert runs["bias"][0]["bias"] == runs["bias-plain"][0]["bias"]


def test_a_skipped_step_leaves_the_bias(runs):
    steps = runs["bias-skip"][0]["steps"]
    assert [s["skipped"] for s in steps] == [False, True, False]
    assert steps[1]["after"] == steps[1]["before"] and steps[0]["after"] != steps[0]["before"]
    assert steps[2]["after"] == _rule(steps[2]["before"], steps[2]["counts"])


@pytest.mark.parametrize("name", list(RESUMED))
def test_new_options_resume_exactly(runs, name):
    straight, first, resumed = (runs[(k, name)] for k in ("straight", "first", "resumed"))
    assert sorted(resumed[0]["losses"]) == ["3", "4"]
    for it in ("1", "2"):
        assert first[0]["losses"][it] == straight[0]["losses"][it]
    for it in ("3", "4"):
        assert resumed[0]["losses"][it] == straight[0]["losses"][it], (it, name)
    for r in (0, 1):  # biases, tables, projections: equal on both ranks and after the resume
        for field in ("bias", "tables", "projs"):
            assert resumed[r][field] == straight[r][field] == straight[0][field], field
    assert straight[0]["losses"]["1"] != straight[0]["losses"]["4"]


def test_bias_stays_fp32_under_bf16(runs):
    run = runs[("straight", "self-bias-bf16-z2")][0]
    assert run["param_dtype"] == "torch.bfloat16" and run["bias_dtypes"] == ["torch.float32"]


def test_balanced_hash_table_equals_an_independent_reference(runs, shakespeare_prefix):
    data = IndexedDataset(shakespeare_prefix)
    lo, hi = parse_split("95,5,0", data.num_documents)[:2]
    freq = np.zeros(50304, dtype=np.int64)
    for d in range(lo, hi):
        np.add.at(freq, np.asarray(data[d], dtype=np.int64), 1)
    ref = balanced_hash_table(torch.from_numpy(freq.astype(np.float64)), 4, 2)
    straight = runs[("straight", "hash-balanced-z2")]
    table0 = torch.tensor(straight[0]["table0"])
    assert table0.shape == ref.shape and len(straight[0]["steps"]) == 4
    # layer 0's table is the reference with its experts relabelled by one permutation
    relabel = {}
    for a, b in zip(ref.view(-1).tolist(), table0.view(-1).tolist(), strict=True):
        assert relabel.setdefault(a, b) == b
    assert sorted(relabel.values()) == [0, 1, 2, 3]
    assert straight[0]["tables"] == straight[1]["tables"]  # the same on every rank
    assert len(set(straight[0]["tables"])) == 2  # per layer: two different relabellings


def test_shared_balanced_hash_on_mock_data(runs):
    per_rank = runs["hash-shared-mock"]
    assert per_rank[0]["tables"] == per_rank[1]["tables"]
    assert len(set(per_rank[0]["tables"])) == 1  # one table for every layer
