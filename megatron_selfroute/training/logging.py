"""Interval metrics: Megatron-style console lines, TensorBoard scalars, routing statistics."""
from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_selfroute.moe.stats import routing_metrics
from megatron_selfroute.parallel.groups import all_reduce_small


def is_rank0() -> bool:
    """True on global rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args) -> None:
    """Print on global rank 0 only."""
    if is_rank0():
        print(*args, flush=True)


class RoutingAccumulator:
    """Sums routed-token counts [L, E] and dropped routes [L] over an interval."""

    def __init__(self) -> None:
        self.counts: Optional[torch.Tensor] = None
        self.dropped: Optional[torch.Tensor] = None

    def add(self, counts_LE: torch.Tensor, dropped_L: torch.Tensor) -> None:
        # Accumulated where the counts are (no device sync per micro-batch); read at reduce.
        c, d = counts_LE.detach().to(torch.int64), dropped_L.detach().to(torch.int64)
        if self.counts is None:
            self.counts, self.dropped = c.clone(), d.clone()
        else:
            self.counts += c
            self.dropped += d

    def reduce_and_reset(self, group=None) -> Optional[dict[str, list[float]]]:
        """All-reduce over data-parallel ranks; per-layer metrics (None without MoE layers)."""
        if self.counts is None:
            return None
        both = all_reduce_small(torch.cat([self.counts.reshape(-1), self.dropped]),
                                group=group).cpu()
        n = self.counts.numel()
        counts = both[:n].view_as(self.counts)
        metrics = routing_metrics(counts, both[n:])
        metrics["counts"] = counts.tolist()
        self.counts = self.dropped = None
        return metrics


class MetricsLogger:
    """Rank-0 writer of console lines and TensorBoard scalars (and optional wandb)."""

    def __init__(self, tensorboard_dir: Optional[str], config_dict: dict,
                 wandb_project: Optional[str] = None) -> None:
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.writer = None
        self.wandb = None
        if not self.rank0:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
            self.writer.add_text("config", "```\n" + json.dumps(config_dict, indent=1) + "\n```")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb-project needs `pip install wandb`") from None
            self.wandb = wandb.init(project=wandb_project, config=config_dict)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Write `prefix/name` scalars."""
        if not self.rank0:
            return
        for name, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if self.writer is not None:
                self.writer.add_scalar(f"{prefix}/{name}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def routing(self, prefix: str, metrics: Optional[dict], step: int) -> None:
        """Per-MoE-layer normalised entropy, max expert fraction, dropped fraction and dead
        experts."""
        if metrics is None:
            return
        values = {}
        for i in range(len(metrics["normalized_entropy"])):
            values[f"moe_layer_{i}/normalized_entropy"] = metrics["normalized_entropy"][i]
            values[f"moe_layer_{i}/max_expert_fraction"] = metrics["max_fraction"][i]
            values[f"moe_layer_{i}/dropped_fraction"] = metrics["dropped_fraction"][i]
            if "dead_experts" in metrics:
                values[f"moe_layer_{i}/dead_experts"] = metrics["dead_experts"][i]
        self.scalars(f"{prefix}-routing", values, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def format_eta(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Timer:
    """Wall-clock stopwatch that synchronises CUDA at start and stop once CUDA is in use
    (Megatron's timers do the same: the step timer waits twice a step; --timing-log-level 1+
    adds a wait per part and micro-batch). `torch.cuda.is_initialized` is a flag read;
    `is_available` queries the driver (NVML) on every call, 0.1 ms each on this CPU machine."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start: Optional[float] = None

    def start(self) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._start

    def pop(self) -> float:
        t, self.total = self.total, 0.0
        return t


class Timers:
    """Named stopwatches up to --timing-log-level (1: data, forward, backward, optimizer;
    2: also the NaN check and ZeRO-0 clipping). Level 0 costs nothing."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.timers: dict[str, Timer] = {}

    def __call__(self, name: str, level: int):
        if level > self.level:
            return contextlib.nullcontext()
        timer = self.timers.setdefault(name, Timer())

        @contextlib.contextmanager
        def timed():
            timer.start()
            yield
            timer.stop()

        return timed()

    def pop_ms(self, iterations: int) -> dict[str, float]:
        return {k: 1000 * t.pop() / iterations for k, t in self.timers.items()}
