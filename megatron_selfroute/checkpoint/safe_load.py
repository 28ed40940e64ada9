"""The one way this project opens a pickle: `torch.load(weights_only=True)` with the allow-list
of types a DeepSpeed checkpoint of this project really holds; anything else is refused with a one-
line reason and never executed (also inside DeepSpeed's own loading, through
`SafeCheckpointEngine`)."""
from __future__ import annotations

import os
from typing import Any

import torch

from megatron_selfroute.checkpoint import CheckpointLoadError


def safe_globals() -> list:
    """Types a DeepSpeed checkpoint of this project really holds, beyond tensors and containers."""
    import argparse
    import collections

    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [argparse.Namespace, collections.OrderedDict, ZeroStageEnum, fragment_address,
               torch.Size]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover - depends on DeepSpeed version
        pass
    return allowed


def describe_load_error(e: BaseException) -> str:
    """One line saying why torch.load(weights_only=True) refused a file."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Weights only load failed"):
        detail = [ln for ln in lines[1:]
                  if not ln.startswith(("Please file an issue", "Check the documentation"))]
        return "weights_only=True rejected it: " + (detail[0] if detail else "unsupported data")
    return lines[0]


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True and the allow-list; CheckpointLoadError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointLoadError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unsafe or corrupt: never fall back to a full unpickle
        raise CheckpointLoadError(f"{path}: refused to load ({describe_load_error(e)})"
                                  ) from None


class SafeCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: every file it loads goes through `safe_load`, and
    every file it saves through `writes.torch_save` (fsynced; a failed write is recorded, the
    partial file removed, and the rank goes on with DeepSpeed's collectives: the save's verdict
    is taken over all ranks afterwards)."""

    def __init__(self, inner, expert_writers: int = 1) -> None:
        self._inner = inner
        self.failures: list[str] = []
        self._fault = None
        self.expert_writers = expert_writers

    def is_data_parallel_writer(self, rank: int) -> bool:
        """DeepSpeed asks this, at save time, with a rank's expert-data rank: only writers save
        the MoE model's files (model states, expert files, ZeRO-0 optimizer states). With tensor
        parallelism the expert-data group spans the TP group (ranks 0..T-1 of it are the first
        replica's T tensor-parallel ranks), and each of those must write its own mp_rank files:
        T writers. (DeepSpeed's engine-init use of this method saw the inner engine.)"""
        return rank < self.expert_writers

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def begin_save(self, fault=None) -> None:
        self.failures, self._fault = [], fault

    def end_save(self) -> list[str]:
        failures, self.failures, self._fault = self.failures, [], None
        return failures

    def save(self, state_dict, path: str) -> None:
        from megatron_selfroute.checkpoint.writes import torch_save

        if self.failures:  # this rank already failed this save: write nothing more
            return
        zipfile = getattr(self._inner, "zipfile_serialization", False)
        err = torch_save(state_dict, path, self._fault, zipfile)
        if err:
            self.failures.append(err)

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)
