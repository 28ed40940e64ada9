"""Tensor parallelism inside harness processes (issue 20): a TP model against the one-device model
of the same config and seed, on the same batch, with no engine in between.

Each case builds the one-device `GPTModel(cfg)` (the reference, whole on every rank) and the same
config sharded over the layout's tensor group (`parallelize_gpt`), runs forward and backward on one
batch, and returns the differences: loss, every shard's gradient against the matching slice of
the reference gradient (`tp_shard` of the full gradient; expert and router gradients summed over
the tensor group first where the engine would sum them), the top-k ids of every token, and the
logits of an evaluation forward (gathered over the vocabulary).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed.harness import argv_cases
from tests.distributed.train_cases import MOCK, TINY

DENSE = [a for i, a in enumerate(TINY) if "--num-experts" not in TINY[max(i - 1, 0):i + 1]]
BASE = DENSE + MOCK + ["--micro-batch-size", "2", "--hidden-dropout", "0", "--attention-dropout",
                      "0", "--train-iters", "1"]


def _batch(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)
    index = torch.arange(b * s).view(b, s) + 1000
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), index


def compare(argv: list[str]) -> dict:
    from megatron_selfroute.arguments import parse_args
    from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt
    from megatron_selfroute.parallel.layout import ParallelLayout
    from megatron_selfroute.parallel.tensor_parallel import is_tp_sharded

    cfg, _ = parse_args(BASE + argv)
    layout = ParallelLayout.from_config(cfg).build_groups()
    torch.manual_seed(0)
    ref = GPTModel(cfg)
    torch.manual_seed(0)
    tp = parallelize_gpt(GPTModel(cfg, init=False), layout)
    tokens, labels, index = _batch(cfg)
    out = {}
    for name, model in (("ref", ref), ("tp", tp)):
        res = model(tokens, labels=labels, token_index=index)
        loss = res.loss.mean() + res.aux_loss
        loss.backward()
        out[name] = (loss.detach(), model.routing_ids() if model.moe_layers else None)
    ref_grads = dict(ref.named_parameters())
    worst_grad, names = 0.0, []
    group = layout.tp_group
    for name, p in tp.named_parameters():
        if p.grad is None:
            raise AssertionError(f"{name}: no gradient on tensor-parallel rank {layout.tp_rank}")
        g = p.grad.clone()
        if ".deepspeed_experts." in name:  # the engine sums expert gradients over TP x EDP
            dist.all_reduce(g, group=group)
        ref_p = ref_grads[_ref_name(name, tp)]
        want = p.tp_shard(ref_p.grad) if is_tp_sharded(p) else ref_p.grad
        assert want.shape == g.shape, (name, want.shape, g.shape)
        err = ((g - want).abs().max() / (want.abs().max() + 1e-12)).item()
        worst_grad = max(worst_grad, err)
        names.append(name)
    with torch.no_grad():
        ref.eval()
        tp.eval()
        ref_logits = ref(tokens).logits
        tp_logits = tp(tokens).logits
    same_ids = None
    if out["ref"][1] is not None:
        same_ids = bool(torch.equal(out["ref"][1], out["tp"][1]))
    return {"loss_ref": out["ref"][0].item(), "loss_tp": out["tp"][0].item(),
            "worst_grad_rel": worst_grad, "same_ids": same_ids, "params": len(names),
            "sharded": sum(is_tp_sharded(p) for p in tp.parameters()),
            "logits_rel": ((tp_logits - ref_logits).abs().max()
                           / ref_logits.abs().max()).item()}


def _ref_name(name: str, model) -> str:
    from megatron_selfroute.models.common import layout_free_names

    return layout_free_names(model)[name]


def dropout() -> dict:
    """Attention dropout at TP = 2 (Megatron's model-parallel RNG): on identical inputs the two
    TP ranks' heads get different masks (head h of rank 0 and of rank 1 are other heads of the
    model), the default generator is left where it was (replicated activations drop alike on
    both ranks), and recompute (full, or selective core_attn) replays the masks: every gradient
    equals the run without recompute from the same generator states."""
    from megatron_selfroute.arguments import parse_args
    from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt
    from megatron_selfroute.parallel.layout import ParallelLayout
    at = BASE.index("--attention-dropout")
    flags = BASE[:at] + ["--attention-dropout", "0.3"] + BASE[at + 2:] + [
        "--num-experts", "4", "--tensor-model-parallel-size", "2"]
    out, grads = {}, {}
    for name, extra in (("plain", []), ("full", ["--recompute-granularity", "full"]),
                        ("selective", ["--recompute-granularity", "selective",
                                       "--recompute-modules", "core_attn"])):
        cfg, _ = parse_args(flags + extra)
        layout = ParallelLayout.from_config(cfg).build_groups()
        model = parallelize_gpt(GPTModel(cfg, init=False), layout)  # a fresh TP stream
        if name == "plain":
            attn = model.transformer.h[0].attn
            start = model.tp_rng.snapshot()
            torch.manual_seed(7)  # identical inputs and default generators on both ranks
            q = torch.randn(2, attn.num_heads, 8, 8)
            before = torch.get_rng_state()
            y = attn._core(q, q, q, None)
            out["default_untouched"] = bool(torch.equal(before, torch.get_rng_state()))
            both = [torch.empty_like(y) for _ in range(2)]
            dist.all_gather(both, y, group=layout.tp_group)
            out["masks_differ"] = not torch.equal(both[0], both[1])
            model.tp_rng.load(start)
        torch.manual_seed(123)  # every model starts from the same generator states
        tokens, labels, index = _batch(cfg)
        res = model(tokens, labels=labels, token_index=index)
        (res.loss.mean() + res.aux_loss).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in ("full", "selective"):
        out[f"{name}_worst"] = max(((grads[name][n] - g).abs().max()
                                    / (g.abs().max() + 1e-12)).item()
                                   for n, g in grads["plain"].items())
    return out


CASES = argv_cases("MSR_TP_ARGV", compare)
CASES["dropout"] = dropout
