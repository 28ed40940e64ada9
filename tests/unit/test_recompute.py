"""Megatron core's recompute options (models/recompute.py): every option gives the gradients of
no recompute (GPT MoE with dropout, and ViT), recomputes what it says (the block groups and
parts that run twice), and saves fewer activation bytes in the stated order; the flags'
contradictions are one-line errors."""
import pytest
import torch

from megatron_selfroute.config import ConfigError
from megatron_selfroute.models import recompute
from megatron_selfroute.models.gpt import GPTModel
from tests.integration.helpers import tiny_config

OPTIONS = {
    "none": {},
    "full-uniform-1": {"recompute_granularity": "full"},
    "full-uniform-2": {"recompute_granularity": "full", "recompute_num_layers": 2},
    "full-block-1": {"recompute_granularity": "full", "recompute_method": "block",
                     "recompute_num_layers": 1},
    "selective-core_attn": {"recompute_activations": True},
    "selective-all": {"recompute_granularity": "selective",
                      "recompute_modules": list(recompute.MODULES)},
}


def build(option, num_layers=4):
    cfg = tiny_config("learned", vocab=100)
    cfg.model.num_layers = num_layers
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.1
    cfg.moe.moe_shared_expert_intermediate_size = 16
    cfg.moe.moe_layer_freq = 2  # dense and MoE blocks
    for k, v in OPTIONS[option].items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    return GPTModel(cfg).train()


def step(model):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(7)  # dropout
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=torch.roll(ids, -1, 1))
    (out.loss.mean() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, saved


@pytest.fixture(scope="module")
def results():
    return {name: step(build(name)) for name in OPTIONS}


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "none"])
def test_gradients_equal_no_recompute(results, option):
    loss0, grads0, _ = results["none"]
    loss, grads, _ = results[option]
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    assert grads.keys() == grads0.keys()
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_saved_activation_bytes_follow_the_options(results):
    saved = {name: r[2] for name, r in results.items()}
    print("saved activation bytes:", {k: f"{v / 1024:.0f} KiB" for k, v in saved.items()})
    assert saved["full-uniform-1"] < saved["selective-all"] < saved["selective-core_attn"] \
        < saved["none"]
    assert saved["full-uniform-2"] < saved["full-uniform-1"]  # fewer checkpointed inputs
    assert saved["full-uniform-1"] < saved["full-block-1"] < saved["none"]  # 3 blocks keep all


def test_groups_of_each_method():
    plan = recompute.RecomputePlan("full", "uniform", 3)
    assert plan.full_blocks(8) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert recompute.RecomputePlan("full", "block", 2).full_blocks(8) == [[0], [1]]
    assert recompute.RecomputePlan("selective", modules=frozenset({"mlp"})).full_blocks(8) == []


def test_selective_recomputes_only_the_listed_parts():
    """Count forward calls of each part over one forward + backward: listed parts run twice."""
    model = build("selective-core_attn", num_layers=2)
    calls = {"core": 0, "ln": 0}
    block = model.transformer.h[0]
    core, ln = block.attn._core, block.ln_1.forward

    def count_core(*a):
        calls["core"] += 1
        return core(*a)

    def count_ln(*a):
        calls["ln"] += 1
        return ln(*a)

    block.attn._core, block.ln_1.forward = count_core, count_ln
    step(model)
    assert calls == {"core": 2, "ln": 1}


@pytest.mark.parametrize("flags,message", [
    ({"recompute_activations": True, "recompute_granularity": "full"},
     "--recompute-activations (selective) conflicts with --recompute-granularity full"),
    ({"recompute_method": "block"}, "need --recompute-granularity full"),
    ({"recompute_granularity": "full", "recompute_num_layers": 9},
     "--recompute-num-layers must be between 1 and --num-layers 4, got 9"),
    ({"recompute_granularity": "selective", "recompute_modules": []},
     "needs --recompute-modules"),
])
def test_contradictions_are_named(flags, message):
    cfg = tiny_config("self", vocab=100)
    cfg.model.num_layers = 4
    for k, v in flags.items():
        setattr(cfg.model, k, v)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recompute.resolve(cfg.model)
