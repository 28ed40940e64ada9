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


SYNC_CODE = r"""
import torch
from deepspeed.accelerator import get_accelerator
from megatron_selfroute.arguments import parse_args
from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt
from megatron_selfroute.parallel.engine import build_engine
from megatron_selfroute.parallel.layout import ParallelLayout, private_process_group
from megatron_selfroute.training.loop import resolve_config

argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "8", "--max-position-embeddings", "8", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--micro-batch-size", "2",
        "--train-iters", "4"]
acc = get_accelerator()
calls = []
plain = acc.synchronize
acc.synchronize = lambda *a, **k: (calls.append(1), plain(*a, **k))[1]
counts = []
with private_process_group():
    for extra in (None, {"timers": {"throughput": {"enabled": True}}}):
        cfg, _ = parse_args(argv)
        layout = ParallelLayout.from_config(cfg).build_groups()
        cfg = resolve_config(cfg, layout)
        engine = build_engine(parallelize_gpt(GPTModel(cfg, init=False), layout), cfg, layout,
                              extra)
        tokens = torch.arange(16).view(2, 8)
        del calls[:]
        for _ in range(4):  # DeepSpeed's timer starts at its step 2
            out = engine(tokens, labels=tokens)
            engine.backward(out.loss.mean())
            engine.step()
        counts.append(len(calls))
print("counts", counts)
"""


def test_deepspeed_throughput_timer_never_synchronises_the_device():
    """DeepSpeed's throughput timer (on by default) synchronises the device at every forward
    and step; the generated config turns it off (a user JSON may turn it back on)."""
    import os
    import subprocess
    import sys

    from tests.integration.helpers import ROOT

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SYNC_CODE], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, deepspeed_default = eval(proc.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    assert ours == 0 and deepspeed_default > 0, (ours, deepspeed_default)
