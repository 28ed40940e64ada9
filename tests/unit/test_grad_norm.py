"""The ZeRO-0 global gradient norm and clipping (`clip_gradients_stage0`) against a float64 norm
of every gradient concatenated, computed here by hand: fp32 accumulation per tensor (the
default, as Megatron's and DeepSpeed's norms), float64 with --grad-norm-fp64, bf16 gradients
accumulated in fp32 (not rounded to bf16 per tensor), and the clip factor applied in place."""
import math

import pytest
import torch
from torch import nn

from megatron_selfroute.parallel.engine import GradNormGroups, clip_gradients_stage0
from megatron_selfroute.parallel.layout import ParallelLayout


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 256), nn.LayerNorm(256),
                          nn.Linear(256, 64), nn.Linear(64, 64, bias=False)).to(dtype)
    model[3].weight.allreduce = False  # DeepSpeed's mark of an expert parameter
    model[3].bias.allreduce = False
    model[4].weight.tp_shard = (0, 2)  # a tensor-parallel shard (summed over the TP group)
    gen = torch.Generator().manual_seed(1)
    for i, p in enumerate(model.parameters()):
        scale = 10.0 ** (i % 4 - 2)  # magnitudes 1e-2 .. 10, as layers' gradients differ
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(dtype)
    model[2].bias.grad = None  # a parameter without a gradient is left out
    return model


def _reference(model: nn.Module) -> float:
    flat = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()
                      if p.grad is not None])
    return math.sqrt(float((flat * flat).sum()))


def test_parameters_are_classified_once_in_model_order():
    model = _model()
    groups = GradNormGroups.of(model)
    params = list(model.parameters())
    assert groups.experts == (params[5], params[6])
    assert groups.sharded == (params[7],)
    assert groups.replicated == tuple(params[:5])


@pytest.mark.parametrize("fp64,rtol", [(False, 1e-6), (True, 1e-12)])
def test_norm_equals_the_float64_norm_of_all_gradients(fp64, rtol):
    model = _model()
    ref = _reference(model)
    norm = clip_gradients_stage0(model, 0.0, ParallelLayout.single(), fp64=fp64)
    assert norm == pytest.approx(ref, rel=rtol)


def test_bf16_gradients_accumulate_in_fp32():
    model = _model(torch.bfloat16)
    ref = _reference(model)
    norm = clip_gradients_stage0(model, 0.0, ParallelLayout.single())
    # A per-tensor norm rounded to bf16 (8 significant bits) would be off by ~1e-3.
    assert norm == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_scales_every_gradient_by_the_global_factor(max_norm):
    model = _model()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref = _reference(model)
    groups = GradNormGroups.of(model)
    norm = clip_gradients_stage0(model, max_norm, ParallelLayout.single(), groups)
    factor = max_norm / (ref + 1e-6) if ref > max_norm else 1.0
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.grad, before[n] * factor, rtol=1e-6, atol=0)
        else:
            assert p.grad is None
    assert norm == pytest.approx(ref, rel=1e-6)
