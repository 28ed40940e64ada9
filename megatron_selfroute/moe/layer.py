"""The MoE layer.

Vocabulary (shape suffixes: T tokens, D hidden, E experts, K top-k, R routed rows):

- logits  `logits_TE`: each token's score for each expert, made by the router (`router.py`).
- probs   `probs_TK`: combine weights of the selected experts (softmax over the selected k).
- routing `ids_TK`: expert ids per token (+ `keep_TK` when a capacity drops routes).
- dispatch: the dispatcher moves each routed token to its expert (`dispatcher.py`).
- experts: each expert is a GPT-2 MLP applied to its rows.
- combine: outputs are weighted by probs and summed back per token.

`MoELayer.forward` = route -> dispatcher.dispatch -> experts -> dispatcher.combine.

The layer subclasses DeepSpeed's `deepspeed.moe.layer.MoE`: the DeepSpeed engine recognises MoE only
through that class, and only then reduces expert gradients over the expert-data-parallel group and
saves experts one file per expert. It always holds a DeepSpeed `MOELayer` (`deepspeed_moe`) with
DeepSpeed's `Experts` container, so both dispatchers share parameter names, the expert-parallel
process group, parameter tagging (`allreduce=False`, `group_name`) and the checkpoint layout; the
`alltoall` dispatcher uses the same experts without DeepSpeed's padded buffers.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import Tensor, nn

from megatron_selfroute.config import ModelConfig, MoEConfig
from megatron_selfroute.models.transformer import MLP
from megatron_selfroute.moe.dispatcher import (
    AllToAllDispatcher,
    DeepSpeedGateAdapter,
    run_experts,
)
from megatron_selfroute.moe.router import build_router


class MoELayer(DeepSpeedMoE):
    """Top-k MoE replacing a block's MLP; a DeepSpeed `MoE` module for the engine's sake."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, layer_number: int,
                 moe_index: int, ep_size: int = 1, seed: int = 0) -> None:
        # DeepSpeed's MoE.__init__ builds its own TopKGate; set up the same attributes instead.
        nn.Module.__init__(self)
        n = moe_cfg.num_experts
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = n
        self.num_local_experts = n // ep_size
        self.layer_number = layer_number
        self.moe_index = moe_index
        self.dispatcher_type = moe_cfg.moe_token_dispatcher_type
        self.expert_compute = moe_cfg.moe_grouped_gemm
        self.router = build_router(moe_cfg, model_cfg.hidden_size, layer_number, moe_index,
                                   seed, model_cfg.init_method_std)
        expert = MLP(model_cfg.hidden_size, moe_cfg.moe_ffn_hidden_size or model_cfg.ffn_size,
                     bias=not model_cfg.disable_bias_linear,
                     gelu_approximation=model_cfg.gelu_approximation)
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(DeepSpeedGateAdapter(n), experts, self.expert_group_name,
                                      ep_size, self.num_local_experts)
        self.ep_group = None
        self.ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        self.dispatcher = AllToAllDispatcher(n, self.num_local_experts, None, ep_size)
        self.last_tokens_per_expert: Optional[Tensor] = None
        self.last_dropped: Optional[Tensor] = None

    @property
    def local_experts(self) -> nn.ModuleList:
        """This rank's experts (global ids ep_rank * L ... ep_rank * L + L - 1)."""
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_expert_parallel_group(self, group) -> None:
        """Use `group` as the expert-parallel group (the engine does this via DeepSpeed groups)."""
        if self.ep_size > 1 and group is None:
            raise ValueError(f"MoE layer {self.layer_number}: EP size {self.ep_size} needs a group")
        if group is not None:
            rank = dist.get_rank(group)
            if rank != self.ep_rank:
                raise RuntimeError(
                    f"expert-parallel rank {rank} differs from the rank {self.ep_rank} the experts "
                    "were initialised for (expert groups must be consecutive ranks)"
                )
        self.ep_group = group
        self.dispatcher.ep_group = group
        self.deepspeed_moe._set_ep_group(group)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine: create DeepSpeed's expert groups and adopt ours."""
        from deepspeed.utils import groups

        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not supported")
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size)
        self.set_expert_parallel_group(groups._get_expert_parallel_group(self.expert_group_name))

    def forward(self, hidden_states: Tensor, token_index: Optional[Tensor] = None,
                iteration: int = 0) -> tuple[Tensor, Tensor]:
        """[..., D] -> ([..., D] output, fp32 router loss (aux + z))."""
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        tok_T = token_index.reshape(-1) if token_index is not None else None
        routing = self.router(x_TD, tok_T, iteration)
        self.last_tokens_per_expert = routing.tokens_per_expert_E.detach()
        self.last_dropped = routing.dropped.detach()
        if self.dispatcher_type == "deepspeed":
            self.deepspeed_moe.gate.set_routing(routing)
            y_TD = self.deepspeed_moe(x_TD, None)
        else:
            rows_RD, counts, state = self.dispatcher.dispatch(x_TD, routing)
            out_RD = run_experts(self.local_experts, rows_RD, counts, self.expert_compute)
            y_TD = self.dispatcher.combine(out_RD, state)
        return y_TD.view(shape), routing.aux_loss + routing.z_loss

