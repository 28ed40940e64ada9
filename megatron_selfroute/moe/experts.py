"""The experts of one MoE layer: their weights and their compute (the only module that knows the
expert MLP's parameter names, `c_fc` and `c_proj`).

Shape suffixes: R routed rows, D hidden, F expert FFN size, G local experts.

`Experts` extends DeepSpeed's `Experts` container, whose `deepspeed_experts.<i>` names DeepSpeed's
checkpoint code matches literally (one file per global expert) and whose parameter tags
(`allreduce=False`, `group_name`) make the engine reduce expert gradients over the expert-data-
parallel group. A layer is built holding all E experts as placeholders on the meta device (no
memory); `materialize` keeps this rank's contiguous block of global ids and allocates only those
(`to_empty`), and the model's `init_weights` then fills them from (seed, name, global id), so every
layout starts from the same model.

Compute, both on contiguous row blocks (expert g's `counts[g]` rows follow expert g-1's):
- loop: one GEMM pair per non-empty expert (counts read on the host);
- grouped: `torch._grouped_mm` per projection, counts left on the device (bf16 on Hopper).
`forward` keeps DeepSpeed's capacity-buffer form for its `MOELayer` (the reference dispatcher).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts as DeepSpeedExperts
from torch import Tensor, nn


class Experts(DeepSpeedExperts):
    """This rank's experts (GPT-2 MLPs) and their padding-free compute."""

    def __init__(self, prototype: nn.Module, num_experts: int, group_name: str) -> None:
        # Placeholders for every expert on the meta device; `prototype` is consumed (moved).
        super().__init__(prototype.to("meta"), num_experts, group_name)
        self.num_experts = num_experts
        self.first_expert = 0  # global id of local expert 0
        # Run every expert, also on zero rows (tensor parallelism): every rank of the expert-data
        # group then makes every expert's gradient, so ZeRO's gradient buckets fill in the same
        # order on all of them, interleaved identically with the router's TP gradient sum.
        self.every_expert = False

    @property
    def is_materialized(self) -> bool:
        return not any(p.is_meta for p in self.parameters())

    def global_id(self, local: int) -> int:
        """Global expert id of local expert `local`."""
        return self.first_expert + local

    def materialize(self, ids: range, group_name: str, device: torch.device) -> None:
        """Keep the experts with global ids `ids` (a contiguous block) and allocate them on
        `device`, uninitialised (the model's `init_weights` or a state-dict load fills them)."""
        if self.is_materialized:
            raise RuntimeError("experts were already materialised (parallelize once)")
        if len(self.deepspeed_experts) != self.num_experts:
            raise RuntimeError("materialize expects the full set of placeholder experts")
        kept = nn.ModuleList([self.deepspeed_experts[g] for g in ids])
        kept.to_empty(device=device)
        self.deepspeed_experts = kept
        self.num_local_experts = len(ids)
        self.first_expert = ids.start
        for param in self.parameters():  # tags DeepSpeed reads (lost by to_empty)
            param.allreduce = False
            param.group_name = group_name

    def compute(self, x_RD: Tensor, counts: Tensor | list[int], mode: str = "auto") -> Tensor:
        """Apply local expert g to its contiguous row block of `x_RD` ([R, D], `counts[g]` rows
        each). `mode`: loop, grouped, or auto (grouped for bf16 on Hopper, else the loop)."""
        experts = self.deepspeed_experts
        if mode == "grouped" or (mode == "auto" and grouped_mm_available(
                x_RD, experts[0].c_fc.weight.shape[0])):
            return self._grouped(x_RD, counts)
        if torch.is_tensor(counts):
            counts = counts.tolist()
        outs = []
        for expert, rows in zip(experts, torch.split(x_RD, counts), strict=True):
            outs.append(expert(rows) if rows.shape[0] or self.every_expert else rows)
        return torch.cat(outs) if outs else x_RD

    def _grouped(self, x_RD: Tensor, counts: Tensor | list[int]) -> Tensor:
        experts = self.deepspeed_experts
        if x_RD.shape[0] == 0:
            if self.every_expert:  # zero gradients for every expert (see `every_expert`)
                return x_RD + 0.0 * torch.stack([p.sum() for p in self.parameters()]).sum()
            return x_RD.clone()
        counts_G = torch.as_tensor(counts, device=x_RD.device)
        offs = counts_G.cumsum(0).to(torch.int32)
        fc_w_GFD = torch.stack([e.c_fc.weight for e in experts])
        proj_w_GDF = torch.stack([e.c_proj.weight for e in experts])
        h_RF = torch._grouped_mm(x_RD, fc_w_GFD.transpose(1, 2), offs=offs)
        onehot_RG = None
        if experts[0].c_fc.bias is not None or experts[0].c_proj.bias is not None:
            # Per-row expert bias as a GEMM with the rows' one-hot expert matrix: exact forward
            # (one non-zero term per row), and a backward (onehot^T @ grad) that sums each
            # expert's rows with fp32 accumulation; gathering bias[group] would sum them in bf16
            # atomics instead.
            row_R1 = torch.arange(x_RD.shape[0], device=x_RD.device).unsqueeze(1)
            onehot_RG = ((row_R1 >= offs - counts_G) & (row_R1 < offs)).to(x_RD.dtype)
        if experts[0].c_fc.bias is not None:
            h_RF = h_RF + onehot_RG @ torch.stack([e.c_fc.bias for e in experts])
        h_RF = F.gelu(h_RF, approximate=experts[0].gelu_approximation)
        y_RD = torch._grouped_mm(h_RF, proj_w_GDF.transpose(1, 2), offs=offs)
        if experts[0].c_proj.bias is not None:
            y_RD = y_RD + onehot_RG @ torch.stack([e.c_proj.bias for e in experts])
        return y_RD


def grouped_mm_available(x: Tensor, ffn_size: int) -> bool:
    """torch's grouped GEMM for bf16 on Hopper (capability 9.x) with 16-byte-aligned rows
    (hidden and FFN sizes multiples of 8). Not chosen automatically elsewhere: pytorch issue
    #172439 reports non-zero weight gradients for experts without tokens on capability 10
    (B200). `--moe-grouped-gemm grouped` still forces it."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.shape[-1] % 8 == 0 and ffn_size % 8 == 0)
