"""Under tensor parallelism every expert must make a gradient on every rank, also when the rank
routed no rows to it (ZeRO buckets fill in the same order on every expert-data rank): the
per-expert loop and the grouped GEMM on zero rows give exactly-zero gradients, never None."""
import pytest
import torch

from megatron_selfroute.models.transformer import MLP
from megatron_selfroute.moe.experts import Experts


@pytest.mark.parametrize("mode,rows", [("loop", [0, 0, 0, 0]), ("loop", [3, 0, 2, 0]),
                                       ("grouped", [0, 0, 0, 0])])
def test_every_expert_gets_a_gradient(mode, rows):
    experts = Experts(MLP(8, 16, bias=True), 4, "ep_size_1")
    experts.materialize(range(4), "ep_size_1", torch.device("cpu"))
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    experts.every_expert = True
    x = torch.randn(sum(rows), 8, requires_grad=True)
    experts.compute(x, torch.tensor(rows), mode).sum().backward()
    for g, n in enumerate(rows):
        for p in experts.deepspeed_experts[g].parameters():
            assert p.grad is not None
            assert (p.grad.abs().sum() == 0) == (n == 0)
