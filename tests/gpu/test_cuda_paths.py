"""CUDA-only checks of the MoE layer's GPU paths (`pytest -m gpu tests/gpu`, run by
tools/gpu_report.sh). Deselected by default; on a machine without CUDA they fail, never skip.

- bf16 grouped expert compute (`torch._grouped_mm`) and the per-expert loop both match an fp64
  per-row reference within bf16 rounding, forward and backward;
- the single-GPU alltoall path (self router, dropless, grouped) never waits for the device
  (`torch.cuda.set_sync_debug_mode("error")` turns any host sync into an error);
- under `torch.use_deterministic_algorithms(True)` two identical steps give bit-identical outputs
  and gradients;
- experts that receive no rows get exactly zero gradients, grouped and loop.
"""
import pytest
import torch

from megatron_selfroute.config import Config
from megatron_selfroute.moe.layer import MoELayer

pytestmark = pytest.mark.gpu
DEV = "cuda"

D, FFN, E, T = 256, 1024, 8, 4096


@pytest.fixture(autouse=True)
def _needs_cuda():
    assert DEV != "cuda" or torch.cuda.is_available(), \
        "tests/gpu needs a CUDA device (these tests never skip)"


def make_layer(router="self", mode="auto", dtype=torch.bfloat16, bias=True):
    cfg = Config()
    cfg.model.hidden_size, cfg.model.ffn_hidden_size = D, FFN
    cfg.model.disable_bias_linear = not bias
    m = cfg.moe
    m.num_experts, m.moe_router_topk, m.router_type = E, 2, router
    m.moe_grouped_gemm = mode
    torch.manual_seed(0)
    layer = MoELayer(cfg.model, m, layer_number=1, moe_index=0, seed=0)
    layer.parallelize(0, 1, None, torch.device("cpu"))
    layer.reset_experts(seed=0, std=0.02)
    return layer.to(DEV, dtype)


def inputs(dtype=torch.bfloat16, seed=1):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(T, D, device=DEV, generator=gen).to(dtype).requires_grad_(True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def expert_fp64(expert, xs):
    """One GPT-2 MLP expert in fp64 on the fp64 rows `xs` (its weights copied to their device)."""
    def w(t):
        return 0 if t is None else t.detach().double().to(xs.device)

    h = xs @ w(expert.c_fc.weight).t() + w(expert.c_fc.bias)
    h = torch.nn.functional.gelu(h, approximate=expert.gelu_approximation)
    return h @ w(expert.c_proj.weight).t() + w(expert.c_proj.bias)


def per_row_reference(layer, x):
    """fp64 on the CPU, one token at a time: the layer's own routing decision, experts applied
    row by row from their weights (no dispatcher, no grouped GEMM)."""
    routing = layer.router(x.detach())
    ids, probs = routing.ids_TK.cpu(), routing.probs_TK.double().cpu()
    xs = x.detach().double().cpu()
    out = torch.zeros(T, D, dtype=torch.float64)
    for j in range(ids.shape[1]):
        for e in range(E):
            rows = (ids[:, j] == e).nonzero().flatten()
            if rows.numel():
                out[rows] += probs[rows, j:j + 1] * expert_fp64(layer.local_experts[e], xs[rows])
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_grouped_and_loop_match_fp64_reference(bias):
    results = {}
    for mode in ("grouped", "loop"):
        layer = make_layer(mode=mode, bias=bias)
        x = inputs()
        y, _ = layer(x)
        ref = per_row_reference(layer, x)
        assert torch.isfinite(y).all()
        results[mode] = (rel(y.cpu(), ref), y, layer, x)
    (err_g, y_g, layer_g, x_g), (err_l, y_l, layer_l, x_l) = results["grouped"], results["loop"]
    print(f"bias={bias}: relative error vs fp64, grouped {err_g:.2e}, loop {err_l:.2e}")
    assert err_g < 1e-2 and err_l < 1e-2
    # Backward: grouped gradients equal the loop's within bf16 rounding.
    w = torch.randn(D, device=DEV, dtype=torch.bfloat16)
    (y_g.float() * w).sum().backward()
    (y_l.float() * w).sum().backward()
    assert rel(x_g.grad, x_l.grad) < 2e-2
    for (n, p_g), (_, p_l) in zip(layer_g.named_parameters(), layer_l.named_parameters(),
                                  strict=True):
        if p_l.grad is not None:
            assert p_g.grad is not None, n
            assert rel(p_g.grad, p_l.grad) < 2e-2, n


def test_single_gpu_moe_layer_never_syncs():
    layer = make_layer(mode="grouped")
    x = inputs()
    layer(x)[0].float().sum().backward()  # warm-up (allocator, cuBLAS handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
        (y.float().sum() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()


def test_deterministic_mode_repeats_bit_exactly():
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            layer = make_layer(router="learned", mode="grouped")
            x = inputs()
            y, aux = layer(x)
            (y.float().square().mean() + aux).backward()
            runs.append((y.detach(), x.grad, [p.grad for p in layer.parameters()]))
    finally:
        torch.use_deterministic_algorithms(False)
    (y0, gx0, g0), (y1, gx1, g1) = runs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_experts_without_rows_get_exactly_zero_gradients(mode):
    """Row blocks [3, 0, 517, 0, 64, 0, 0, 1000]: outputs match an fp64 per-row reference, and the
    experts with no rows get all-zero weight and bias gradients (pytorch#172439 saw otherwise for
    grouped_mm on B200)."""
    layer = make_layer(router="learned", mode=mode)
    counts = [3, 0, 517, 0, 64, 0, 0, 1000]
    gen = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(sum(counts), D, device=DEV, generator=gen).to(torch.bfloat16)
    y = layer.experts.compute(x, torch.tensor(counts, device=DEV), mode)
    blocks = torch.split(x.double(), counts)
    ref = torch.cat([expert_fp64(ex, xs) for ex, xs in zip(layer.local_experts, blocks,
                                                             strict=True)])
    assert rel(y, ref) < 1e-2
    y.float().square().sum().backward()
    for e, c in enumerate(counts):
        for p in layer.local_experts[e].parameters():
            if c == 0:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, (mode, e)
            else:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, (mode, e)
