"""Every rank's RNG states in a form `torch.load(weights_only=True)` accepts (tensors, ints,
floats, strings, tuples): torch, Python's `random`, numpy, CUDA when present, and the
tensor-parallel dropout stream (`parallel/tensor_parallel.TensorParallelRNG`) once it was used."""
from __future__ import annotations

import random

import numpy as np
import torch


def _encode_numpy(np_state: tuple) -> tuple:
    return (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
            int(np_state[3]), float(np_state[4]))


def capture() -> dict:
    """This process's generator states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _encode_numpy(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tp = _tp_rng()
    if tp is not None and tp.states:  # attention dropout's stream under tensor parallelism
        state["tensor_parallel"] = tp.snapshot()
    return state


def _tp_rng():
    from megatron_selfroute.parallel.tensor_parallel import tp_rng

    return tp_rng()


def restore(state: dict) -> None:
    """Inverse of `capture`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tp = _tp_rng()
    if tp is not None and "tensor_parallel" in state:
        tp.load(state["tensor_parallel"])


def seeded(seed: int) -> dict:
    """States in `capture`'s format freshly seeded with `seed` (for converted checkpoints)."""
    return {"torch": torch.Generator().manual_seed(seed).get_state(),
            "python": random.Random(seed).getstate(),
            "numpy": _encode_numpy(np.random.RandomState(seed % 2**32).get_state())}
