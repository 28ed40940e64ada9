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


def capture(tp_rng=None) -> dict:
    """This process's generator states (and `tp_rng`'s, the model's tensor-parallel dropout
    stream, once it was drawn from)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _encode_numpy(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if tp_rng is not None and tp_rng.states:
        state["tensor_parallel"] = tp_rng.snapshot()
    return state


def restore(state: dict, tp_rng=None) -> None:
    """Inverse of `capture`; a state without a tensor-parallel stream (written before it
    existed, or before its first draw) starts `tp_rng` afresh."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if tp_rng is not None:
        tp_rng.load(state.get("tensor_parallel", {}))


def seeded(seed: int) -> dict:
    """States in `capture`'s format freshly seeded with `seed` (for converted checkpoints)."""
    return {"torch": torch.Generator().manual_seed(seed).get_state(),
            "python": random.Random(seed).getstate(),
            "numpy": _encode_numpy(np.random.RandomState(seed % 2**32).get_state())}
