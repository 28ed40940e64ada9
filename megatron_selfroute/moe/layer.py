"""The MoE layer.

Vocabulary (shape suffixes: T tokens, D hidden, E experts, K top-k, R routed rows):

- logits  `logits_TE`: each token's score for each expert, made by the router (`router.py`).
- probs   `probs_TK`: combine weights of the selected experts (softmax over the selected k).
- routing `ids_TK`: expert ids per token (+ `keep_TK` when a capacity drops routes).
- dispatch: the dispatcher moves each routed token to its expert (`dispatcher.py`).
- experts: each expert is a GPT-2 MLP applied to its rows (`experts.py`).
- combine: outputs are weighted by probs and summed back per token.

`MoELayer.forward` = router -> dispatcher (dispatch -> experts -> combine), the routing decision
passed along as an argument. The layer is built for one device with every expert as a meta-device
placeholder; `parallelize` (called by the model family's `parallelize`) keeps and allocates this
rank's experts and wires the expert-parallel group. It is a DeepSpeed `MoE` module only through
`EngineMoE` (`deepspeed_adapter.py`), for the engine's sake.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_selfroute.config import ModelConfig, MoEConfig
from megatron_selfroute.models.transformer import MLP
from megatron_selfroute.moe.context import RoutingContext
from megatron_selfroute.moe.deepspeed_adapter import EngineMoE, ExpertSlot
from megatron_selfroute.moe.dispatcher import DISPATCHERS
from megatron_selfroute.moe.experts import Experts
from megatron_selfroute.moe.router import build_router
from megatron_selfroute.parallel.tensor_parallel import (
    gather_from_tp,
    gather_rows,
    own_rows,
    split_to_tp,
    tp_sum_hook,
)
from megatron_selfroute.seeding import mix_seed


class MoELayer(EngineMoE):
    """Top-k MoE replacing a block's MLP: router + dispatcher + experts."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, layer_number: int,
                 moe_index: int, seed: int = 0) -> None:
        super().__init__(moe_cfg.num_experts)
        self.layer_number = layer_number
        self.moe_index = moe_index
        self.ep_rank = 0
        # Built in this order, eagerly, so construction draws the global RNG exactly as one
        # eagerly built router and expert always have (dropout streams follow it); the seeded
        # `init_weights` overwrites both.
        self.router = build_router(moe_cfg, model_cfg.hidden_size, layer_number, moe_index,
                                   seed, model_cfg.init_method_std,
                                   model_cfg.padded_vocab_size if model_cfg.vocab_size else None)
        prototype = MLP(model_cfg.hidden_size, moe_cfg.moe_ffn_hidden_size or model_cfg.ffn_size,
                        bias=not model_cfg.disable_bias_linear,
                        gelu_approximation=model_cfg.gelu_approximation)
        self.deepspeed_moe = ExpertSlot(Experts(prototype, self.num_experts,
                                                self.expert_group_name))
        self.dispatcher = DISPATCHERS[moe_cfg.moe_token_dispatcher_type](
            self.num_experts, moe_cfg.moe_grouped_gemm)
        self.last_tokens_per_expert: Optional[Tensor] = None
        self.last_dropped: Optional[Tensor] = None
        self.last_ids: Optional[Tensor] = None  # [T, K] expert ids of the last forward
        self.tp_group = None  # set_tensor_parallel

    @property
    def experts(self) -> Experts:
        """This layer's experts (all placeholders before `parallelize`)."""
        return self.deepspeed_moe.experts

    @property
    def expert_compute(self) -> str:
        """Expert compute mode (--moe-grouped-gemm): auto, loop or grouped."""
        return self.dispatcher.expert_compute

    @expert_compute.setter
    def expert_compute(self, mode: str) -> None:
        self.dispatcher.expert_compute = mode

    @property
    def local_experts(self):
        """This rank's experts as a ModuleList (global ids first_expert ... + num_local - 1)."""
        return self.experts.deepspeed_experts

    def parallelize(self, ep_rank: int, ep_size: int, ep_group, device: torch.device) -> None:
        """Keep and allocate this rank's experts (uninitialised) and wire the group."""
        if self.num_experts % ep_size:
            raise ValueError(f"MoE layer {self.layer_number}: {self.num_experts} experts do not "
                             f"split over expert-parallel size {ep_size}")
        if ep_size > 1 and (ep_group is None or dist.get_rank(ep_group) != ep_rank):
            raise RuntimeError(f"MoE layer {self.layer_number}: expert-parallel rank {ep_rank} "
                               "does not match its group (groups must come from the layout)")
        self.set_expert_parallel_size(ep_size)
        self.ep_rank = ep_rank
        n = self.num_local_experts
        self.experts.materialize(range(ep_rank * n, (ep_rank + 1) * n), self.expert_group_name,
                                 device)
        self.dispatcher.wire(self.experts, ep_group, ep_size)

    def set_tensor_parallel(self, group) -> None:
        """Route, dispatch and compute 1/T of the tokens on each rank of the tensor group (the
        tokens entering the layer are the same on all T ranks), then gather the outputs. The
        router's weights are replicated but see 1/T of the tokens: their gradients are summed
        over the group as they are made (a hook, before any ZeRO bucket takes them); the
        experts' are summed by the engine, whose expert-data group spans the tensor group."""
        self.tp_group = group
        self.router.tp_group = group
        self.experts.every_expert = True
        for p in self.router.parameters():
            p.register_hook(tp_sum_hook(group))

    def reset_experts(self, seed: int, std: float) -> None:
        """N(0, std) weights and zero biases for this rank's experts, drawn from
        (seed, layer, global expert id): for a layer used on its own (benchmarks, tests); models
        initialise through their `init_weights`."""
        with torch.no_grad():
            for local, expert in enumerate(self.local_experts):
                gen = torch.Generator().manual_seed(
                    mix_seed(seed, self.layer_number, self.experts.global_id(local)))
                for name, p in expert.named_parameters():
                    if name.endswith("bias"):
                        p.zero_()
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, hidden_states: Tensor, ctx: Optional[RoutingContext] = None
                ) -> tuple[Tensor, Tensor]:
        """[..., D] -> ([..., D] output, fp32 router loss (aux + z))."""
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        flat = (ctx or RoutingContext()).flat()
        group = self.tp_group
        if group is not None:
            x_TD, flat = self._own_tokens(x_TD, flat)
        routing = self.router(x_TD, flat)
        counts, dropped = routing.tokens_per_expert_E.detach(), routing.dropped.detach()
        ids = routing.ids_TK.detach()
        if group is not None:  # statistics of every token of the tensor group
            both = torch.cat([counts, dropped.reshape(1)])
            dist.all_reduce(both, group=group)
            counts, dropped, ids = both[:-1], both[-1], gather_rows(ids, group)
        self.last_tokens_per_expert, self.last_dropped, self.last_ids = counts, dropped, ids
        y_TD = self.dispatcher(x_TD, routing, self.experts)
        if group is not None:
            y_TD = gather_from_tp(y_TD, group)
        return y_TD.view(shape), routing.aux_loss + routing.z_loss

    def _own_tokens(self, x_TD: Tensor, flat: RoutingContext) -> tuple[Tensor, RoutingContext]:
        """This tensor-parallel rank's contiguous 1/T of the tokens, with their global token
        index (the random router hashes it: the same decision as in one process) and ids."""
        group = self.tp_group
        tp = dist.get_world_size(group)
        if x_TD.shape[0] % tp:
            raise ValueError(f"MoE layer {self.layer_number}: {x_TD.shape[0]} tokens per "
                             f"micro-batch do not split over --tensor-model-parallel-size {tp} "
                             "(change --micro-batch-size)")
        index = flat.token_index
        if index is None:
            index = torch.arange(x_TD.shape[0], device=x_TD.device)
        ids = flat.token_ids
        return split_to_tp(x_TD, group), RoutingContext(
            own_rows(index, group), None if ids is None else own_rows(ids, group),
            flat.iteration)
