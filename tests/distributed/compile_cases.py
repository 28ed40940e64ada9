"""--compile runs inside harness processes: training runs by argv (as train_cases), and a count of
the graphs torch.compile builds over 1 and over 20 steps."""
from __future__ import annotations

import torch

from tests.distributed.harness import argv_cases
from tests.distributed.train_cases import MOCK, TINY, run

GRAPHS = {"n": 0}


def _register() -> str:
    import torch._dynamo

    name = "msr_counting"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        @torch._dynamo.register_backend(name=name)
        def counting(gm, example_inputs):  # noqa: ARG001 - torch's backend signature
            GRAPHS["n"] += 1
            return gm.forward
    return name


def recompiles() -> dict:
    """Graphs built by a 1-step and a 20-step compiled run of the learned router (whose expert
    counts change every step), each from a fresh dynamo cache: equal when nothing recompiles."""
    import torch._dynamo

    backend = _register()
    counts = {}
    for iters in (1, 20):
        torch._dynamo.reset()
        GRAPHS["n"] = 0
        run(MOCK + ["--router-type", "learned", "--micro-batch-size", "2", "--train-iters",
                    str(iters), "--compile", "--compile-backend", backend])
        counts[str(iters)] = GRAPHS["n"]
    return counts


CASES = dict(argv_cases("MSR_ARGV", run), recompiles=recompiles)
assert TINY  # the model every case trains (train_cases.run prepends it)
torch  # noqa: B018 - imported for the backend registry
