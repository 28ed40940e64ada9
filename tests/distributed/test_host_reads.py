"""No host waits inside a micro-batch (issue 19, part 5): with the loss sums and the NaN flag on
the device and checked once per step, a step's host reads do not grow with the number of
micro-batches, and none happens inside `Trainer.micro_batch` (forward, loss bookkeeping,
backward, routing counts) at EP = 1 with the counts kept on the device (grouped expert compute).
The two reads a micro-batch still needs by design are pinned to their sites: the per-expert
loop's split sizes (`--moe-grouped-gemm loop`, CPU's default) and, with EP > 1, the uneven
all-to-all's split sizes. Counted with a TorchFunctionMode (tests/distributed/host_read_cases.py).
"""
from collections import Counter

from tests.distributed.harness import check, spawn
from tests.distributed.host_read_cases import CONFIGS_1, CONFIGS_2


def _results(tmp_path, configs, world):
    cases = [f"{name}/{a}" for name in configs for a in (1, 4)]
    res = spawn(world, "tests.distributed.host_read_cases", cases, tmp_path / f"w{world}",
                timeout=600)
    return {c: check(res, c) for c in cases}


def test_no_host_reads_inside_micro_batches(tmp_path):
    one = _results(tmp_path, CONFIGS_1, 1)
    two = _results(tmp_path, CONFIGS_2, 2)
    for name in CONFIGS_1:
        r1, r4 = one[f"{name}/1"][0], one[f"{name}/4"][0]
        assert (r1["accum"], r4["accum"]) == (1, 4)
        print(name, "per step:", Counter(r4["step"]), "| host-batch checks:", r4["host_batch"])
        # Once-per-step reads only: the same sites for 1 and for 4 micro-batches.
        assert r1["step"] == r4["step"], (name, r1["step"], r4["step"])
        assert len(r4["step"]) <= 4, (name, r4["step"])
        # The host-side token-range check reads the loader's CPU batch once per micro-batch.
        assert r4["host_batch"] == 4 * r1["host_batch"]
        if name == "learned_loop":  # one split-size read per MoE layer and micro-batch
            assert set(r4["micro"]) == {"experts.py:compute:tolist"}, r4["micro"]
            assert len(r4["micro"]) == 4 * len(r1["micro"]) == 4 * 2
        else:
            assert r1["micro"] == [] and r4["micro"] == [], (name, r4["micro"])
    for name in CONFIGS_2:
        for rank in (0, 1):
            r1, r4 = two[f"{name}/1"][rank], two[f"{name}/4"][rank]
            assert r1["step"] == r4["step"], (name, rank, r1["step"], r4["step"])
            if name.startswith("ep2"):  # the all-to-all's send and receive split sizes
                assert set(r4["micro"]) <= {"dispatcher.py:dispatch:tolist"}, r4["micro"]
                assert len(r4["micro"]) == 4 * len(r1["micro"]) > 0
            else:
                assert r4["micro"] == [], (name, rank, r4["micro"])
