"""Expert parallelism on 2 and 4 gloo processes equals one process holding all experts.

All cases of a world size run in one spawned group; `-m slow` adds the full 4-process matrix.
"""
import pytest

from tests.distributed import ep_cases
from tests.distributed.harness import check, spawn

CI_FOUR = [n for n in ep_cases.build_cases(4)
           if n.startswith(("layer/self/", "layer/random/", "edge/", "init/"))
           and "/ep1" not in n]


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    names = list(ep_cases.build_cases(2))
    return names, spawn(2, "tests.distributed.ep_cases", names, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def four_proc(tmp_path_factory):
    return spawn(4, "tests.distributed.ep_cases", CI_FOUR, tmp_path_factory.mktemp("ep4"))


def test_two_processes_all_cases(two_proc):
    names, results = two_proc
    assert len(names) >= 20
    for name in names:
        check(results, name)


def test_two_processes_edge_cases_move_what_they_should(two_proc):
    _, results = two_proc
    # every token on rank 0's experts: rank 0 sends nothing to its peer
    sent = [r["sent_rows"] for r in check(results, "edge/one_expert/alltoall/ep2")]
    assert sent[0] == 0 and sent[1] > 0
    # a plain batch moves rows both ways
    assert all(r["sent_rows"] > 0 for r in check(results, "layer/learned/alltoall/ep2"))


def test_four_processes_ci_subset(four_proc):
    assert len(CI_FOUR) >= 10
    for name in CI_FOUR:
        check(four_proc, name)


@pytest.mark.slow
def test_four_processes_full_matrix(tmp_path):
    names = list(ep_cases.build_cases(4))
    results = spawn(4, "tests.distributed.ep_cases", names, tmp_path)
    for name in names:
        check(results, name)
