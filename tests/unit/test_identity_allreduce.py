"""One process, ZeRO-0: the engine skips DeepSpeed's identity gradient all-reduce (issue 19) but
keeps what it did besides: a parameter without a gradient at the accumulation boundary (an
expert no token chose) gets a zero one, so AdamW steps it (weight decay, decaying moments). The
reference is DeepSpeed's own `allreduce_gradients` on an engine built the same way."""
import os
import subprocess
import sys

from tests.integration.helpers import ROOT

CODE = r"""
import torch
from megatron_selfroute.arguments import parse_args
from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt
from megatron_selfroute.parallel.engine import build_engine
from megatron_selfroute.parallel.layout import ParallelLayout, private_process_group
from megatron_selfroute.training.loop import resolve_config

argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "8", "--max-position-embeddings", "8", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--micro-batch-size", "2",
        "--train-iters", "2", "--weight-decay", "0.1", "--lr", "1e-2"]
out = []
with private_process_group():
    for deepspeed_own in (False, True):
        cfg, _ = parse_args(argv)
        layout = ParallelLayout.from_config(cfg).build_groups()
        cfg = resolve_config(cfg, layout)
        torch.manual_seed(0)
        engine = build_engine(parallelize_gpt(GPTModel(cfg, init=False), layout), cfg, layout)
        if deepspeed_own:  # DeepSpeed's fallback all-reduce over the group of one
            engine.enable_backward_allreduce = True
            engine.allreduce_gradients = type(engine).allreduce_gradients.__get__(engine)
        tokens = torch.arange(16).view(2, 8)
        for _ in range(2):
            # only the embedding is in this loss: every other parameter has no gradient
            loss = engine.module.transformer.wte(tokens).pow(2).sum()
            engine.backward(loss)
            engine.step()
        out.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
ours, theirs = out
assert set(ours) == set(theirs)
for n in ours:
    assert torch.equal(ours[n], theirs[n]), n
print("ok")
"""


def test_one_process_zero0_steps_parameters_without_gradients_as_deepspeed_does():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
