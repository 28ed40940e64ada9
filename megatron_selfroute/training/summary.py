"""`--run-summary PATH`: one JSON per run that a sweep can aggregate without parsing logs.

Rank 0 writes it atomically when the run ends (finished, or an exit: `complete` says which) and
merges it with the file a previous segment of the same run left (a resume), keyed by iteration:
train and held-out losses, the held-out token counts, tokens/s and step times of the logged
intervals (medians reported), peak memory (CUDA: max allocated; CPU: the process's max RSS),
the last evaluation's routing statistics, and two digests that make pairing checkable:

- `data_digest`: SHA-256 over the per-iteration digests of the input tokens rank 0 consumed (its
  data-parallel share, in order; the sample indices for tasks without tokens) — equal for two
  runs exactly when they read the same batches;
- `init_digest`: per parameter (layout-free name: global expert ids), the float64 sum and sum of
  squares of its initial values on rank 0 — equal for the parameters two rows share exactly when
  they started from the same values (up to the precision of those two moments).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_selfroute.config import Config


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@torch.no_grad()
def init_digest(model: torch.nn.Module) -> dict[str, list[float]]:
    """{layout-free parameter name: [sum, sum of squares]} in float64."""
    from megatron_selfroute.models.common import layout_free_names

    names = layout_free_names(model)
    out = {}
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        t = p.detach().double()
        out[names[name]] = [float(t.sum()), float(t.square().sum())]
    return out


class RunSummary:
    """Collects what the summary reports during a run; `write` at its end."""

    def __init__(self, path: str, cfg: Config, model: torch.nn.Module) -> None:
        self.path = path
        self.cfg = cfg
        self.init = init_digest(model)
        self.steps: dict[int, str] = {}  # iteration -> digest of its batches
        self._step: Optional[Any] = None
        self._step_it = 0
        self.train_loss: dict[int, float] = {}
        self.valid_loss: dict[int, float] = {}
        self.valid_metrics: dict[int, dict[str, float]] = {}
        self.tokens_per_sec: list[float] = []
        self.step_ms: list[float] = []
        self.routing: Optional[dict] = None

    def note_batch(self, iteration: int, data: Optional[torch.Tensor]) -> None:
        """One host-side micro-batch of `iteration` (its tokens, or sample indices)."""
        if data is None:
            return
        if self._step is None or self._step_it != iteration:
            self._close_step()
            self._step, self._step_it = hashlib.sha256(), iteration
        self._step.update(data.detach().cpu().to(torch.int64).numpy().tobytes())

    def _close_step(self) -> None:
        if self._step is not None:
            self.steps[self._step_it] = self._step.hexdigest()[:16]
            self._step = None

    def note_log(self, tokens_per_sec: float, step_ms: float) -> None:
        self.tokens_per_sec.append(tokens_per_sec)
        self.step_ms.append(step_ms)

    def note_eval(self, iteration: int, loss: float, routing: Optional[dict],
                  metrics: Optional[dict] = None) -> None:
        self.valid_loss[iteration] = loss
        self.valid_metrics[iteration] = {k: float(v) for k, v in (metrics or {}).items()}
        self.routing = routing

    def write(self, iteration: int, train_loss: dict[int, float], complete: bool,
              router: str, tokens_per_sample: Optional[int] = None) -> None:
        self._close_step()
        if not _rank0():
            return
        tr, m = self.cfg.train, self.cfg.model
        old = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("config", {}).get("model") != self.cfg.to_dict()["model"] or \
                    old.get("seed") != tr.seed:
                old = {}  # another run's file: replaced
        steps = {**old.get("step_digests", {}), **{str(k): v for k, v in self.steps.items()}}
        train = {**old.get("train_loss", {}), **{str(k): v for k, v in train_loss.items()}}
        valid = {**old.get("valid_loss", {}), **{str(k): v for k, v in self.valid_loss.items()}}
        valid_metrics = {**old.get("valid_metrics", {}),
                         **{str(k): v for k, v in self.valid_metrics.items()}}
        per_sample = tokens_per_sample or m.seq_length
        # the first interval of a segment includes warm-up: left out when there are others
        rates = self.tokens_per_sec[1:] or self.tokens_per_sec
        times = self.step_ms[1:] or self.step_ms
        data = hashlib.sha256("".join(steps[k] for k in sorted(steps, key=int)).encode())
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            kind = "host max RSS (rank 0)"
        out = {
            "complete": complete, "iteration": iteration, "seed": tr.seed, "router": router,
            "tokens_per_iteration": tr.global_batch_size * per_sample,
            "samples_per_iteration": tr.global_batch_size,
            "shape": f"L{m.num_layers}-H{m.hidden_size}-S{per_sample}",
            "train_loss": train, "valid_loss": valid, "valid_metrics": valid_metrics,
            "tokens_per_sec": statistics.median(rates) if rates else old.get("tokens_per_sec"),
            "step_time_ms": statistics.median(times) if times else old.get("step_time_ms"),
            "peak_memory_mb": max(peak, old.get("peak_memory_mb") or 0.0),
            "peak_memory_kind": kind,
            "routing": self.routing if self.routing is not None else old.get("routing"),
            "data_digest": data.hexdigest()[:16], "step_digests": steps,
            "init_digest": old.get("init_digest") or self.init,
            "config": self.cfg.to_dict(),
        }
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, self.path)
