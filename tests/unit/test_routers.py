"""Router-specific properties: parameter counts, fixed-random buffers, random purity, self dims."""
import io
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from megatron_selfroute.config import Config
from megatron_selfroute.models.gpt import GPTModel, num_parameters
from megatron_selfroute.moe.context import RoutingContext


def paper_cfg(router):
    c = Config()
    c.model.vocab_size = 50257
    c.model.disable_bias_linear = True
    c.model.disable_bias_layernorm = True
    c.moe.num_experts, c.moe.moe_router_topk, c.moe.router_type = 8, 2, router
    return c


def test_paper_parameter_counts_exact():
    """GPT-2 small, 8 experts top-2 in every layer, bias-free, vocab 50,304, tied embeddings."""
    counts = {}
    for router in ["learned", "self", "fixed-random", "random"]:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = GPTModel(paper_cfg(router), init=False)
        assert model.transformer.wte.weight.shape[0] == 50304
        counts[router] = num_parameters(model)
        del model
    assert counts["learned"] == 520_809_216
    assert counts["self"] == 520_735_488
    assert counts["fixed-random"] == counts["self"] == counts["random"]
    assert counts["learned"] - counts["self"] == 12 * 768 * 8


def test_declared_router_facts_match_the_model():
    """Each built-in router's declared learned-parameter count is what its model really adds,
    and the FLOP count adds exactly its declared FLOPs (the paper's learned router: 2 x D x E)."""
    from megatron_selfroute.models.gpt import gpt_flops_per_token
    from megatron_selfroute.moe.router import BUILTIN_ROUTERS, ROUTERS

    def build(router):
        with torch.device("meta"):
            return GPTModel(paper_cfg(router), init=False)

    dense = paper_cfg("self")
    dense.moe.num_experts = None
    with torch.device("meta"):
        base_params = num_parameters(GPTModel(dense, init=False))
    for router in BUILTIN_ROUTERS:
        cls = ROUTERS[router]
        cfg = paper_cfg(router)
        model = build(router)
        experts = sum(p.numel() for n, p in model.named_parameters() if "deepspeed_experts" in n)
        dense_mlps = 12 * 2 * 768 * 3072  # the dense model's MLPs, replaced by the experts
        router_params = num_parameters(model) - base_params - experts + dense_mlps
        assert router_params == 12 * cls.learned_parameters(768, 8), router
        extra = gpt_flops_per_token(cfg) - gpt_flops_per_token(paper_cfg("self"))
        assert extra == 12 * cls.flops_per_token(768, 8), router
    assert ROUTERS["learned"].flops_per_token(768, 8) == 2 * 768 * 8


def tiny_cfg(router, **moe):
    c = Config()
    m = c.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 4, 32, 4, 16
    m.vocab_size, m.make_vocab_size_divisible_by = 100, 64
    c.moe.num_experts, c.moe.router_type = 4, router
    for k, v in moe.items():
        setattr(c.moe, k, v)
    return c


def _fixed_random_digest(seed):
    code = (
        "import torch,hashlib;from tests.unit.test_routers import tiny_cfg;"
        "from megatron_selfroute.models.gpt import GPTModel;"
        f"c=tiny_cfg('fixed-random');c.train.seed={seed};m=GPTModel(c);"
        "b=torch.cat([l.router.proj.flatten() for l in m.moe_layers]);"
        "print(hashlib.sha256(b.numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_fixed_random_identical_across_processes_and_seeded():
    a, b = _fixed_random_digest(7), _fixed_random_digest(7)
    assert a == b
    assert a != _fixed_random_digest(8)


def test_fixed_random_buffer_fp32_persistent_and_checkpoint_authoritative(tmp_path):
    model = GPTModel(tiny_cfg("fixed-random"))
    layers = model.moe_layers
    projs = [lay.router.proj for lay in layers]
    assert all(p.dtype == torch.float32 for p in projs)
    assert not any("router.proj" in n for n, _ in model.named_parameters())
    assert all(f"transformer.h.{i}.mlp.router.proj" in model.state_dict() for i in range(4))
    assert not torch.equal(projs[0], projs[1]), "per-layer projections must differ"
    # survives a cast of the whole model to bf16, exactly
    ref = projs[0].clone()
    model.to(torch.bfloat16)
    assert model.moe_layers[0].router.proj.dtype == torch.float32
    assert torch.equal(model.moe_layers[0].router.proj, ref)
    model.float()
    # perturb, save, reload into a fresh model: the perturbed values win over regeneration
    with torch.no_grad():
        model.moe_layers[2].router.proj.add_(1.5)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "m.safetensors"))
    fresh = GPTModel(tiny_cfg("fixed-random"))
    assert not torch.equal(fresh.moe_layers[2].router.proj, model.moe_layers[2].router.proj)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False)
    assert torch.equal(fresh.moe_layers[2].router.proj, model.moe_layers[2].router.proj)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh2 = GPTModel(tiny_cfg("fixed-random"))
    fresh2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh2.moe_layers[2].router.proj, model.moe_layers[2].router.proj)


def test_fixed_random_shared_is_one_projection():
    model = GPTModel(tiny_cfg("fixed-random", fixed_random_shared=True))
    p = [lay.router.proj for lay in model.moe_layers]
    assert all(torch.equal(p[0], q) for q in p[1:])


def ctx(token_index, iteration):
    return RoutingContext(token_index, None, iteration)


def test_random_logits_pure_function():
    model = GPTModel(tiny_cfg("random"))
    r0, r1 = model.moe_layers[0].router, model.moe_layers[1].router
    x = torch.randn(10, 32)
    tok = torch.arange(100, 110)
    a = r0.logits(x, ctx(tok, 5))
    assert torch.equal(a, r0.logits(torch.randn(10, 32), ctx(tok, 5))), "content-free"
    assert not torch.equal(a, r0.logits(x, ctx(tok, 6))), "differs between iterations"
    assert not torch.equal(a, r1.logits(x, ctx(tok, 5))), "differs between layers"
    # a token's logits depend only on its global index, not on the batch it sits in
    torch.testing.assert_close(r0.logits(x[3:5], ctx(tok[3:5], 5)), a[3:5], rtol=0, atol=0)
    # other seed, other logits; roughly standard normal
    other = GPTModel(tiny_cfg("random"))
    other.moe_layers[0].router.seed = 99
    assert not torch.equal(a, other.moe_layers[0].router.logits(x, ctx(tok, 5)))
    big = r0.logits(torch.zeros(20000, 32), ctx(torch.arange(20000), 1))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def test_random_router_identical_under_recompute():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    results = []
    for recompute in (False, True):
        cfg = tiny_cfg("random")
        cfg.model.recompute_granularity = "full" if recompute else None
        model = GPTModel(cfg)
        model.train()
        out = model(ids, labels=ids, iteration=3)
        out.loss.mean().backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in
                                            model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], rtol=1e-6, atol=1e-7)


def _capture_moe_inputs(model):
    seen = {}
    for i, block in enumerate(model.transformer.h):
        block.ln_2.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
    return seen


def test_self_logits_are_chosen_post_layernorm_coordinates():
    for dims, lo in [("last", lambda i: 32 - 4), ("first", lambda i: 0),
                     ("per-layer", lambda i: 32 - 4 * (i + 1))]:
        model = GPTModel(tiny_cfg("self", self_route_dims=dims))
        seen = _capture_moe_inputs(model)
        ids = torch.randint(0, 100, (2, 16))
        model(ids)
        for i, layer in enumerate(model.moe_layers):
            h = seen[i].reshape(-1, 32)
            got = layer.router.logits(h, RoutingContext())
            torch.testing.assert_close(got, h[:, lo(i):lo(i) + 4].float(), rtol=0, atol=0)
            # and routing really used them: top-2 of those coordinates
            top = torch.topk(h[:, lo(i):lo(i) + 4], 2, -1).indices
            counts = torch.bincount(top.reshape(-1), minlength=4)
            assert torch.equal(counts, layer.last_tokens_per_expert)


def test_unparallelised_model_allocates_no_expert():
    """GPTModel(cfg, init=False): every expert is a meta placeholder (no memory) while the dense
    weights are real; parallelize_gpt on one process allocates and initialises all of them,
    identically to GPTModel(cfg)."""
    from megatron_selfroute.models.gpt import parallelize_gpt
    from megatron_selfroute.parallel.layout import ParallelLayout

    cfg = tiny_cfg("learned")
    skeleton = GPTModel(cfg, init=False)
    for name, p in skeleton.named_parameters():
        assert p.is_meta == ("deepspeed_experts" in name), name
    full = parallelize_gpt(skeleton, ParallelLayout.single(cfg))
    ref = dict(GPTModel(cfg).named_parameters())
    for name, p in full.named_parameters():
        assert not p.is_meta and torch.equal(p, ref[name]), name
