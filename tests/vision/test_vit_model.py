"""The ViT against timm's VisionTransformer (same weights -> same logits), DeiT presets against
timm's parameter counts and DeiT's published GMACs, MoE placement, and the model EMA."""
import pytest
import timm
import torch

from megatron_selfroute.arguments import parse_args
from megatron_selfroute.models.vit import VisionTransformer, vit_flops_per_image
from megatron_selfroute.moe.router import BUILTIN_ROUTERS, ROUTERS
from pretrain_vit import resolve_model

TINY = ["--img-size", "32", "--patch-size", "8", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--drop-path", "0"]


def build(argv):
    cfg, ns = parse_args(argv, sections=("vision",))
    vit = resolve_model(cfg, ns)
    vit.num_classes = 4
    return cfg, vit


def to_timm_names(name: str) -> str:
    for ours, theirs in ((".ln_1.", ".norm1."), (".ln_2.", ".norm2."), ("attn.c_attn", "attn.qkv"),
                         ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("patch_embed.", "patch_embed.proj.")):
        name = name.replace(ours, theirs)
    return name


def test_dense_vit_equals_timm_with_the_same_weights():
    cfg, vit = build(TINY)
    ours = VisionTransformer(cfg, vit).eval()
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=2, num_heads=4,
        qkv_bias=True, class_token=True, global_pool="token").eval()
    with torch.no_grad():  # biases non-zero so they are compared too
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    missing = ref.load_state_dict({to_timm_names(k): v for k, v in ours.state_dict().items()})
    assert not missing.missing_keys and not missing.unexpected_keys
    images = torch.randn(3, 3, 32, 32)
    logits, aux = ours(images)
    torch.testing.assert_close(logits, ref(images), rtol=1e-5, atol=1e-5)
    assert aux.item() == 0.0


@pytest.mark.parametrize("name,gmacs", [("deit_tiny_patch16_224", 1.3),
                                        ("deit_small_patch16_224", 4.6)])
def test_presets_match_timm_parameters_and_deit_gmacs(name, gmacs):
    cfg, vit = build(["--model", name])
    vit.num_classes = 1000
    ours = VisionTransformer(cfg, vit, init=False)
    ref = timm.create_model(name, pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert round(vit_flops_per_image(cfg, vit) / 2e9, 1) == gmacs  # DeiT Table 1
    assert cfg.model.seq_length == 197 and cfg.model.layernorm_epsilon == 1e-6


def test_deit_small_moe_preset_is_every_second_block_4_experts_top2():
    cfg, vit = build(["--model", "deit_small_patch16_224", "--num-experts", "4",
                      "--router-type", "learned"])
    model = VisionTransformer(cfg, vit, init=False)
    assert model.pattern == [0, 1] * 6
    assert [b.is_moe for b in model.blocks] == [bool(v) for v in [0, 1] * 6]
    assert cfg.moe.moe_router_topk == 2 and len(model.moe_layers) == 6
    # the Megatron-DeepSpeed spelling gives the same placement
    cfg2, _ = build(["--model", "deit_small_patch16_224", "--num-experts", "4",
                     "--expert-interval", "2"])
    assert cfg2.moe.layer_pattern(12) == [0, 1] * 6


@pytest.mark.parametrize("router", [r for r in BUILTIN_ROUTERS if not ROUTERS[r].reads_token_ids])
def test_moe_vit_runs_and_reports_routing(router):
    cfg, vit = build(TINY + ["--num-experts", "4", "--router-type", router])
    model = VisionTransformer(cfg, vit)
    token_index = torch.arange(2 * vit.num_tokens).view(2, -1)
    logits, aux = model(torch.randn(2, 3, 32, 32), token_index=token_index)
    logits.sum().backward()
    counts, dropped = model.routing_counts()
    assert logits.shape == (2, 4) and counts.shape == (1, 4)
    assert counts.sum().item() == 2 * vit.num_tokens * 2 and dropped.item() == 0


def test_init_is_a_function_of_seed_and_name():
    cfg, vit = build(TINY + ["--num-experts", "4", "--router-type", "learned"])
    a, b = VisionTransformer(cfg, vit), VisionTransformer(cfg, vit)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    w = a.blocks[1].mlp.local_experts[0].c_fc.weight
    assert abs(w.std().item() - 0.0176) < 0.002 and w.abs().max() <= 0.04  # trunc normal .02
    cfg.train.seed += 1
    assert not torch.equal(VisionTransformer(cfg, vit).head.weight, a.head.weight)


def test_ema_update_checkpoint_names_and_fp32():
    cfg, vit = build(TINY + ["--num-experts", "4"])
    model = VisionTransformer(cfg, vit)
    model.enable_ema()
    before = {k: v.clone() for k, v in model.ema_parameters().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.update_ema(0.9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(model.ema_parameters()[name], 0.9 * before[name] + 0.1 * p)
    keys = model.state_dict().keys()
    assert "ema_cls_token" in keys and "head.ema_weight" in keys
    # expert EMAs sit under the expert modules, so DeepSpeed saves them in the expert files
    assert "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.3.c_fc.ema_weight" in keys
    assert all(not n.split(".")[-1].startswith("ema_") for n, _ in model.named_parameters())
    model.bfloat16()
    assert model.head.weight.dtype == torch.bfloat16
    assert model.head.ema_weight.dtype == torch.float32
    torch.testing.assert_close(model.head.ema_weight, 0.9 * before["head.weight"]
                               + 0.1 * (before["head.weight"] + 1.0))
