"""--compile (models/compile.py, aot_eager backend: inductor costs minutes per case on 2 cores):
compiled and eager training give equal losses within fp32 tolerance for every router and dense,
with EP=2 on 2 processes too; nothing recompiles over 20 steps whose expert counts change; the
inductor backend under -m slow."""
import pytest

from tests.distributed.harness import check, spawn
from tests.distributed.train_cases import MOCK

ROUTERS = ["self", "learned", "fixed-random", "random", "hash", "dense"]
COMPILE = ["--compile", "--compile-backend", "aot_eager"]


def argv(router, extra=()):
    moe = [] if router == "dense" else ["--router-type", router]
    return MOCK + moe + ["--micro-batch-size", "2", "--train-iters", "4", "--eval-interval",
                         "2", "--hidden-dropout", "0.1", *extra]


def _pairs(results, names):
    for name in names:
        eager, compiled = (check(results, f"argv{i}")[0] for i in names[name])
        assert eager["losses"].keys() == compiled["losses"].keys() and eager["losses"]
        for it, loss in eager["losses"].items():
            assert compiled["losses"][it] == pytest.approx(loss, rel=1e-5, abs=1e-6), (name, it)


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    argvs, names = [], {}
    for router in ROUTERS:
        names[router] = (len(argvs), len(argvs) + 1)
        argvs += [argv(router), argv(router, COMPILE)]
    env = {f"MSR_ARGV{i}": "\x1f".join(a) for i, a in enumerate(argvs)}
    cases = [f"argv{i}" for i in range(len(argvs))] + ["recompiles"]
    res = spawn(1, "tests.distributed.compile_cases", cases,
                tmp_path_factory.mktemp("compile1"), env=env, timeout=600)
    return res, names


def test_compiled_losses_equal_eager_for_every_router(one_proc):
    res, names = one_proc
    _pairs(res, names)


def test_nothing_recompiles_as_expert_counts_change(one_proc):
    res, _ = one_proc
    counts = check(res, "recompiles")[0]
    assert counts["1"] > 0 and counts["20"] == counts["1"], counts


def test_ep2_compiled_equals_eager(tmp_path):
    argvs, names = [], {}
    for router in ("self", "learned"):
        ep = ["--expert-model-parallel-size", "2"]
        names[router] = (len(argvs), len(argvs) + 1)
        argvs += [argv(router, ep), argv(router, ep + COMPILE)]
    env = {f"MSR_ARGV{i}": "\x1f".join(a) for i, a in enumerate(argvs)}
    res = spawn(2, "tests.distributed.compile_cases", [f"argv{i}" for i in range(len(argvs))],
                tmp_path, env=env, timeout=600)
    _pairs(res, names)


@pytest.mark.slow
def test_inductor_compiled_equals_eager(tmp_path):
    # no dropout: inductor draws its random numbers with its own generator (same distribution,
    # other masks), so dropout runs are equal only in distribution
    nodrop = ["--hidden-dropout", "0"]
    argvs = [argv("self", nodrop), argv("self", nodrop + ["--compile"])]
    env = {f"MSR_ARGV{i}": "\x1f".join(a) for i, a in enumerate(argvs)}
    res = spawn(1, "tests.distributed.compile_cases", ["argv0", "argv1"], tmp_path, env=env,
                timeout=1200)
    _pairs(res, {"self": (0, 1)})
