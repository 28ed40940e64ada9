"""Optimizer parameter groups and the DeepSpeed config generated from flags."""
from megatron_selfroute.config import Config
from megatron_selfroute.models.gpt import GPTModel
from megatron_selfroute.parallel.engine import deepspeed_config, optimizer_param_groups
from megatron_selfroute.parallel.layout import ParallelLayout


def test_no_weight_decay_on_biases_and_norms_and_moe_groups_split():
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 8
    m.vocab_size = 50
    cfg.moe.num_experts, cfg.moe.router_type = 4, "learned"
    model = GPTModel(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_param_groups(model, weight_decay=0.1)
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.add(name)
            no_decay = name.endswith("bias") or ".ln_" in name or "ln_f" in name
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
            assert bool(g.get("moe")) == ("deepspeed_experts" in name), name
    assert seen == set(names.values())
    assert any(g.get("moe") for g in groups) and any(not g.get("moe") for g in groups)


def test_deepspeed_config_from_flags():
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 16
    cfg.parallel.zero_stage, cfg.train.bf16, cfg.train.clip_grad = 2, True, 0.5
    ds = deepspeed_config(cfg, ParallelLayout(world_size=4),
                          extra={"zero_optimization": {"overlap_comm": True}})
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    assert ds["zero_optimization"] == {"overlap_comm": True, "stage": 2}
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    cfg.parallel.zero_stage, cfg.train.bf16 = 0, False  # ZeRO-0 fp32: exact clipping is ours
    assert deepspeed_config(cfg, ParallelLayout(world_size=4))["gradient_clipping"] == 0.0
