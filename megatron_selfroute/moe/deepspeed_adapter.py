"""The one place DeepSpeed's `MoE` class is used: an adapter for the engine's sake.

DeepSpeed's engine treats a model as MoE only when a module is an instance of
`deepspeed.moe.layer.MoE`; only then does it reduce expert gradients over the expert-data-parallel
group and save experts one file per (MoE layer, global expert). It reads `num_experts`,
`num_local_experts`, `ep_size` and `expert_group_name` from that module, calls
`set_deepspeed_parallelism` -> `_create_process_groups` on it, and routes every state key inside
it that contains "expert" to the per-expert files, matching the prefix
`.deepspeed_moe.experts.deepspeed_experts.` literally. `EngineMoE` provides exactly that (without
DeepSpeed's `__init__`, which builds its own TopKGate), and `ExpertSlot` is the `deepspeed_moe`
module that puts the experts at that path. The groups themselves come from the run's
`ParallelLayout`, which registered them with DeepSpeed before the engine was built.
"""
from __future__ import annotations

from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn


class ExpertSlot(nn.Module):
    """`<layer>.deepspeed_moe`: holds the experts at DeepSpeed's literal checkpoint path."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts


class EngineMoE(DeepSpeedMoE):
    """What DeepSpeed's engine reads from an MoE layer; the layer subclasses this."""

    def __init__(self, num_experts: int) -> None:
        nn.Module.__init__(self)  # not DeepSpeed's: it would build its own gate and experts
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.num_experts = num_experts
        self.set_expert_parallel_size(1)

    def set_expert_parallel_size(self, ep_size: int) -> None:
        """The expert-parallel degree the engine's bookkeeping uses."""
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_local_experts = self.num_experts // ep_size

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: the groups must already exist (ParallelLayout.build_groups)."""
        from deepspeed.utils import groups

        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not supported")
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"expert group {self.expert_group_name} is missing: build the "
                               "model's groups with ParallelLayout.build_groups() before the "
                               "engine")
