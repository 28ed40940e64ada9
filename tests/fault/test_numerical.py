"""A NaN loss stops the run naming the iteration and the last good checkpoint, or under
--skip-nan-steps skips the update (weights unchanged across the step, and the optimizer state
not poisoned: the next step trains), for each optimizer DeepSpeed builds: the torch optimizer
(ZeRO-0 fp32), its unfused bf16 wrapper (ZeRO-0 bf16) and its ZeRO optimizer (ZeRO-1 fp32,
ZeRO-2 bf16). The NaN check is read once per step, so the step's micro-batches all ran their
real backward (NaN gradients included) before the skip discards them."""
import torch

from megatron_selfroute.checkpoint.safe_load import safe_globals
from tests.distributed.harness import spawn
from tests.distributed.train_cases import MOCK

BASE = MOCK + ["--router-type", "learned", "--expert-model-parallel-size", "2",
               "--micro-batch-size", "2", "--global-batch-size", "8"]


def module_weights(path):
    with torch.serialization.safe_globals(safe_globals()):
        sd = torch.load(path / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    return {k: v.float() for k, v in sd.items()}


def test_nan_stop_and_skip(tmp_path):
    variants = {"fp32": ["--zero-stage", "0"], "bf16": ["--zero-stage", "2", "--bf16"],
                "fp32_zero1": ["--zero-stage", "1"], "bf16_zero0": ["--zero-stage", "0", "--bf16"]}
    argvs, names = [], []
    for name, extra in variants.items():
        argvs.append(BASE + extra + ["--train-iters", "5", "--save", str(tmp_path / f"stop_{name}"),
                                     "--save-interval", "2"])
        argvs.append(BASE + extra + ["--train-iters", "4", "--skip-nan-steps", "1", "--save",
                                     str(tmp_path / f"skip_{name}"), "--save-interval", "1"])
        names += [f"stop_{name}", f"skip_{name}"]
    env = {f"MSR_ARGV{i}": "\x1f".join(a) for i, a in enumerate(argvs)}
    env["MEGATRON_SELFROUTE_NAN_AT"] = "3"
    res = spawn(2, "tests.distributed.train_cases", [f"argv{i}" for i in range(len(argvs))],
                tmp_path / "runs", env=env, timeout=600)
    by_name = {n: res[f"argv{i}"] for i, n in enumerate(names)}
    for name in variants:
        for rank_result in by_name[f"stop_{name}"]:
            err = rank_result.get("error", "")
            assert "non-finite loss at iteration 3" in err, err
            assert f"stop_{name}/iter_0000002" in err, err
        skipped = by_name[f"skip_{name}"][0]
        assert "error" not in skipped, skipped
        losses = skipped["losses"]
        assert losses["3"] != losses["3"]  # NaN recorded for the skipped step
        assert all(losses[i] == losses[i] for i in ("1", "2", "4"))
        before = module_weights(tmp_path / f"skip_{name}" / "iter_0000002")
        after = module_weights(tmp_path / f"skip_{name}" / "iter_0000003")
        later = module_weights(tmp_path / f"skip_{name}" / "iter_0000004")
        assert all(torch.equal(before[k], after[k]) for k in before), "skipped step updated"
        assert not all(torch.equal(after[k], later[k]) for k in after), "training stopped"
        assert all(torch.isfinite(v).all() for v in later.values()), "NaN reached the weights"
