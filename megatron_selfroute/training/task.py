"""What a pretraining script hands the training loop (`Task`), and what a run returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from megatron_selfroute.config import Config
from megatron_selfroute.parallel.layout import ParallelLayout


@dataclass
class Task:
    """What a pretraining script provides."""

    # The single-device model; expert weights may stay on the meta device until `parallelize`.
    build_model: Callable[[Config], torch.nn.Module]
    # Applies the layout: keeps this rank's experts, wires the groups, initialises the weights.
    parallelize: Callable[[torch.nn.Module, ParallelLayout], torch.nn.Module]
    build_datasets: Callable[[Config, list[int]], tuple]
    forward_step: Callable[[Any, dict, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    collate: Callable[[list], dict]
    flops_per_sample: Callable[[Config], float]
    tokens_per_sample: Callable[[Config], int]
    # Name of the main loss among forward_step's metrics (the others are averaged and logged).
    loss_name: str = "lm loss"
    # (cfg, dataset, consumed_samples, total_samples, layout) -> iterable of batches; default:
    # the Megatron sequential order of data/samplers.py over the data-parallel ranks.
    make_train_loader: Optional[Callable[[Config, Any, int, int, ParallelLayout], Any]] = None
    # Called once with (model, training dataset) before a run that loaded no weights trains,
    # e.g. balanced hash tables from the training split's token frequencies.
    init_from_data: Optional[Callable[[torch.nn.Module, Any], None]] = None
    # Called after every optimizer step with (engine, iteration), e.g. for a model EMA.
    after_step: Optional[Callable[[Any, int], None]] = None
    report_perplexity: bool = True
    # Called with (engine, batch) on each batch while it is still on the host, before the copy to
    # the device: a place for data checks that would otherwise wait for the GPU.
    check_batch: Optional[Callable[[Any, dict], None]] = None
    # Settings outside Config that fix the model's shape (e.g. image and patch size): saved with
    # every checkpoint and compared on resume.
    shape_config: dict = field(default_factory=dict)
    # The model family (checkpoint/adapters.py) the converters rebuild it as.
    family: str = "gpt"


@dataclass
class RunResult:
    """What a run did (returned to callers and tests)."""

    iteration: int
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> lm loss
    valid_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)  # logged iterations
    exit_reason: str = "done"
    missed_saves: list[int] = field(default_factory=list)  # iterations whose save failed
