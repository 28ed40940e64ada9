"""pretrain_vit.py end to end on gloo processes: a tiny ViT learns the generated classes for every
router and dense; resume at an epoch boundary and mid-epoch is bit-exact with the whole DeiT
recipe on (RandAugment, random erasing, mixup/cutmix, repeated augmentation, drop path, EMA),
including the checkpointed EMA weights; EP=2 on 2 processes equals 1 process."""
from pathlib import Path

import pytest
import torch

from megatron_selfroute.checkpoint.safe_load import safe_globals
from megatron_selfroute.moe.router import BUILTIN_ROUTERS
from megatron_selfroute.moe.router import ROUTERS as REGISTRY
from tests.vision.train_cases import run_layout

# every router a ViT can use (hash reads token ids: language models only, refused for ViT)
ROUTERS = [r for r in BUILTIN_ROUTERS if not REGISTRY[r].reads_token_ids]
# augmentation off so a 30-step run shows learning clearly
EASY = ["--batch-size", "8", "--epochs", "5", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
        "--aa", "none", "--smoothing", "0", "--no-repeated-aug", "--drop-path", "0",
        "--lr", "3e-3", "--warmup-epochs", "1"]
# the DeiT recipe (defaults) with tiny batches: 48 images / 8 = 6 iterations per epoch
RECIPE = ["--batch-size", "8", "--epochs", "2", "--lr", "2e-3", "--warmup-epochs", "0.5",
          "--model-ema", "--model-ema-decay", "0.9", "--num-experts", "4",
          "--router-type", "learned"]
EP = ["--batch-size", "4", "--global-batch-size", "8", "--epochs", "2", "--drop-path", "0",
      "--lr", "2e-3", "--num-experts", "4"]
EP_ROUTERS = ["self", "random"]


def data(root) -> list[str]:
    return ["--data-path", str(root)]


@pytest.fixture(scope="module")
def one_proc_runs(image_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vit1")
    argvs, keys = [], []
    for router in ROUTERS + ["dense"]:
        moe = [] if router == "dense" else ["--num-experts", "4", "--router-type", router]
        argvs.append(data(image_root) + EASY + moe)
        keys.append(("falls", router))
    base = data(image_root) + RECIPE
    argvs.append(base + ["--save", str(tmp / "straight"), "--num-workers", "2"])
    keys.append("straight")
    for name, stop in (("epoch", "6"), ("mid", "3")):
        ckpt = str(tmp / name)
        argvs += [base + ["--save", ckpt, "--exit-interval", stop],
                  base + ["--load", ckpt, "--save", ckpt]]
        keys += [(name, "first"), (name, "resumed")]
    for router in EP_ROUTERS:
        argvs.append(data(image_root) + EP + ["--router-type", router])
        keys.append(("ep1", router))
    return dict(zip(keys, run_layout(tmp / "runs", 1, argvs), strict=True)), tmp


@pytest.mark.parametrize("router", ROUTERS + ["dense"])
def test_loss_falls_for_every_router_and_dense(one_proc_runs, router):
    run = one_proc_runs[0][("falls", router)]
    losses, valid = run["losses"], run["valid"]
    last = sum(losses[str(i)] for i in range(26, 31)) / 5
    assert last < losses["1"] - 0.6, (losses["1"], last)
    assert sorted(valid, key=int) == ["6", "12", "18", "24", "30"]  # every epoch
    assert valid["30"] < valid["6"] - 0.3 and valid["30"] < 0.65, valid


@pytest.mark.parametrize("where,stop", [("epoch", 6), ("mid", 3)])
def test_resume_is_exact(one_proc_runs, where, stop):
    runs = one_proc_runs[0]
    straight = runs["straight"]
    first, resumed = runs[(where, "first")], runs[(where, "resumed")]
    assert first["iteration"] == stop and first["exit"].startswith("--exit-interval")
    assert sorted(resumed["losses"], key=int) == [str(i) for i in range(stop + 1, 13)]
    for it, loss in {**first["losses"], **resumed["losses"]}.items():
        assert loss == straight["losses"][it], (it, loss, straight["losses"][it])
    for it, loss in {**first["valid"], **resumed["valid"]}.items():
        assert loss == straight["valid"][it], it
    assert len(set(straight["losses"].values())) == 12


def _states(ckpt: Path) -> dict:
    """Every tensor of the final checkpoint's model files (dense + one file per expert)."""
    tag = ckpt / "iter_0000012"
    out = {}
    with torch.serialization.safe_globals(safe_globals()):
        for f in sorted(tag.glob("*model_states.pt")):
            sd = torch.load(f, weights_only=True)
            sd = sd["module"] if "module" in sd else sd
            out.update({f"{f.name}:{k}": v for k, v in sd.items()})
    return out


def test_resumed_checkpoint_equals_uninterrupted_one_including_ema(one_proc_runs):
    tmp = one_proc_runs[1]
    straight = _states(tmp / "straight")
    ema_keys = [k for k in straight if k.split(".")[-1].startswith("ema_")]
    assert any("expert_3" in k for k in ema_keys) and any(k.endswith("head.ema_weight")
                                                          for k in ema_keys)
    for where in ("epoch", "mid"):
        resumed = _states(tmp / where)
        assert resumed.keys() == straight.keys()
        for k, v in straight.items():
            assert torch.equal(resumed[k], v), (where, k)
    # the EMA moved away from the weights (decay 0.9 over 12 steps)
    w, e = (straight[k] for k in sorted(k for k in straight if k.endswith("head.weight")
                                        or k.endswith("head.ema_weight")))
    assert not torch.equal(w, e)


def test_expert_parallel_2_procs_equals_1_proc(one_proc_runs, image_root, tmp_path):
    argvs = [data(image_root) + EP + ["--router-type", r, "--expert-model-parallel-size", "2",
                                      "--zero-stage", "2"] for r in EP_ROUTERS]
    two = run_layout(tmp_path, 2, argvs)
    for router, run in zip(EP_ROUTERS, two, strict=True):
        one = one_proc_runs[0][("ep1", router)]
        assert run["losses"].keys() == one["losses"].keys()
        for it, loss in one["losses"].items():
            assert abs(run["losses"][it] - loss) < 1e-5, (router, it, loss, run["losses"][it])
        for it, loss in one["valid"].items():
            assert abs(run["valid"][it] - loss) < 1e-5, (router, it)
