"""Expert-parallel cases run in harness processes: EP layers vs one process holding all experts.

Every rank builds the full single-process reference layer (all experts) with the same seed, then an
expert-parallel layer holding only its local experts with the reference's weights. Each rank routes
its own, differently sized batch. Checked on every rank:
- outputs and input gradients equal the reference run on this rank's tokens alone;
- each local expert's gradient equals the sum, over the ranks of this expert-parallel group, of
  the reference's gradients for that (global) expert;
- router gradients (learned) equal the reference's for this rank's tokens;
- tokens-per-expert counts equal the reference's.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from megatron_selfroute.config import Config
from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt
from megatron_selfroute.moe.context import RoutingContext
from megatron_selfroute.moe.layer import MoELayer
from megatron_selfroute.moe.router import BUILTIN_ROUTERS
from megatron_selfroute.parallel.layout import ParallelLayout, launch_world_size

D, FFN, E = 16, 24, 4
ROUTERS = list(BUILTIN_ROUTERS)


def _cfg(router, dispatcher, capacity=None, **moe_opts):
    cfg = Config()
    cfg.model.hidden_size, cfg.model.ffn_hidden_size = D, FFN
    cfg.model.vocab_size = 4096  # token ids below: rank * 1000 + position (hash reads them)
    m = cfg.moe
    m.num_experts, m.moe_router_topk, m.router_type = E, 2, router
    m.moe_token_dispatcher_type, m.moe_expert_capacity_factor = dispatcher, capacity
    for name, value in moe_opts.items():
        setattr(m, name, value)
    return cfg


def _inputs(rank, variant):
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(5 + 3 * rank, D, generator=gen)
    if variant == "one_expert":  # every token of every rank -> experts 0 and 1 (rank 0's)
        x[:, D - E:] = torch.tensor([9.0, 8.0, -9.0, -9.0])
    elif variant == "rank0_only" and rank == 0:  # rank 0 keeps everything local
        x[:, D - E:] = torch.tensor([9.0, 8.0, -9.0, -9.0])
    tok = rank * 1000 + torch.arange(x.shape[0])
    weight = torch.linspace(-1, 1, D)
    return x, tok, weight


_LAYOUTS: dict[int, ParallelLayout] = {}


def _layout(ep: int) -> ParallelLayout:
    """This group's layout with expert-parallel size `ep` (groups built once per size)."""
    if ep not in _LAYOUTS:
        cfg = _cfg("self", "alltoall")
        cfg.parallel.expert_model_parallel_size = ep
        _LAYOUTS[ep] = ParallelLayout.from_config(cfg).build_groups()
    return _LAYOUTS[ep]


def _run(layer, x, tok, weight):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y, _ = layer(x, RoutingContext(tok, tok, 0))
    (y * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads, layer.last_tokens_per_expert.clone()


def layer_case(router, dispatcher, ep, variant="plain", capacity=None, **moe_opts):
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _cfg(router, dispatcher, capacity, **moe_opts)
    torch.manual_seed(123)
    cpu = torch.device("cpu")
    ref = MoELayer(cfg.model, cfg.moe, layer_number=2, moe_index=0, seed=7)
    ref.parallelize(0, 1, None, cpu)  # one process holding every expert
    ref.reset_experts(seed=7, std=0.1)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
        if ref.router.load_bias is not None:  # a bias that moves selections
            ref.router.load_bias.copy_(torch.tensor([0.8, -0.5, 0.3, -0.6]))
    layout = _layout(ep)
    layer = MoELayer(cfg.model, cfg.moe, layer_number=2, moe_index=0, seed=7)
    layer.parallelize(layout.ep_rank, layout.ep, layout.ep_group, cpu)
    n_loc = E // ep
    ep_rank = rank % ep
    sd = {}
    for name, t in ref.state_dict().items():
        if "deepspeed_experts." in name:
            gid = int(name.split("deepspeed_experts.")[1].split(".")[0])
            if gid // n_loc != ep_rank:
                continue
            name = name.replace(f"deepspeed_experts.{gid}.", f"deepspeed_experts.{gid % n_loc}.")
        sd[name] = t
    layer.load_state_dict(sd, strict=True)

    x, tok, weight = _inputs(rank, variant)
    y, gx, grads, counts = _run(layer, x, tok, weight)
    ry, rgx, rgrads, rcounts = _run(ref, x, tok, weight)
    err = {"out": (y - ry).abs().max().item(), "input_grad": (gx - rgx).abs().max().item()}
    assert torch.equal(counts, rcounts), (counts, rcounts)
    # expert gradients: sum of the reference's over the ranks of my expert-parallel group
    group_ranks = [r for r in range(world) if r // ep == rank // ep]
    expert_ref = {}
    for r in group_ranks:
        xr, tr, wr = _inputs(r, variant)
        g = _run(ref, xr, tr, wr)[2]
        for n, t in g.items():
            if "deepspeed_experts." in n:
                expert_ref[n] = expert_ref.get(n, 0) + t
    for name, g in grads.items():
        if "deepspeed_experts." in name:
            local = int(name.split("deepspeed_experts.")[1].split(".")[0])
            gid = ep_rank * n_loc + local
            want = expert_ref.get(name.replace(f"experts.{local}.", f"experts.{gid}."))
            want = torch.zeros_like(g) if want is None else want
        else:
            want = rgrads[name]
        err[name] = ((g - want).abs().max() / want.abs().max().clamp(min=1)).item()
    worst = max(err.values())
    assert worst < 1e-5, {k: v for k, v in err.items() if v >= 1e-5}
    return {"max_err": worst, "sent_rows": getattr(layer.dispatcher, "last_sent_rows", None)}


def init_case(ep):
    """GPTModel under EP=P starts from exactly the single-process model."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 8
    m.vocab_size = 50
    cfg.moe.num_experts, cfg.moe.router_type = E, "learned"
    full = dict(GPTModel(cfg).named_parameters())
    layout = _layout(ep)
    part = parallelize_gpt(GPTModel(cfg, init=False), layout)
    n_loc, ep_rank = E // ep, dist.get_rank() % ep
    for layer in part.moe_layers:  # only this rank's experts were ever allocated
        assert len(layer.local_experts) == n_loc and layer.experts.first_expert == ep_rank * n_loc
    assert not any(p.is_meta for p in part.parameters())
    for name, p in part.named_parameters():
        if "deepspeed_experts." in name:
            local = int(name.split("deepspeed_experts.")[1].split(".")[0])
            name = name.replace(f"experts.{local}.", f"experts.{ep_rank * n_loc + local}.")
        assert torch.equal(p, full[name]), name
    return {}


def engine_case(ep: int, zero: int):
    """DeepSpeed's engine, given the layout as its mpu, partitions and reduces over the layout's
    own groups (the very group objects), and shutdown-style cleanup forgets the mpu."""
    from deepspeed.utils import groups

    from megatron_selfroute.parallel.engine import build_engine

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 8
    m.vocab_size = 50
    cfg.moe.num_experts, cfg.moe.router_type = E, "learned"
    cfg.parallel.expert_model_parallel_size, cfg.parallel.zero_stage = ep, zero
    cfg.train.micro_batch_size = 1
    layout = _layout(ep)
    engine = build_engine(parallelize_gpt(GPTModel(cfg, init=False), layout), cfg, layout)
    name = f"ep_size_{ep}"
    assert engine.mpu is layout and groups.mpu is layout
    assert groups._get_data_parallel_group() is layout.dp_group
    assert engine.dp_world_size == layout.dp == dist.get_world_size()
    assert groups._get_expert_parallel_group(name) is layout.ep_group
    assert groups._get_expert_data_parallel_group(name) is layout.edp_group
    assert sorted(groups._get_expert_data_parallel_group_ranks(name)) == sorted(
        next(r for r in layout.edp_groups() if dist.get_rank() in r))
    if zero:
        opt = engine.optimizer
        assert opt.dp_process_group is layout.dp_group
        assert opt.model_parallel_group is layout.tp_group and opt.model_parallel_world_size == 1
    groups.mpu = None  # the next cases run without an engine
    return {}


def build_cases(world: int) -> dict:
    """Case name -> callable, for a group of `world` processes."""
    cases = {}
    for router, disp, ep in itertools.product(ROUTERS, ["alltoall", "deepspeed"], [1, 2, 4]):
        if world % ep == 0:
            cases[f"layer/{router}/{disp}/ep{ep}"] = (
                lambda r=router, d=disp, p=ep: layer_case(r, d, p))
    for disp, ep in itertools.product(["alltoall", "deepspeed"], [2, 4]):
        if world % ep:
            continue
        for variant in ["one_expert", "rank0_only"]:
            cases[f"edge/{variant}/{disp}/ep{ep}"] = (
                lambda d=disp, p=ep, v=variant: layer_case("self", d, p, v))
        cases[f"capacity/{disp}/ep{ep}"] = (
            lambda d=disp, p=ep: layer_case("learned", d, p, capacity=0.75))
        # aux-loss-free bias with sigmoid scores (DeepSeek-V3) and with self-routing
        cases[f"sigmoid-bias/{disp}/ep{ep}"] = (
            lambda d=disp, p=ep: layer_case("learned", d, p, moe_router_score_function="sigmoid",
                                            moe_router_enable_expert_bias=True))
        cases[f"self-bias/{disp}/ep{ep}"] = (
            lambda d=disp, p=ep: layer_case("self", d, p, moe_router_enable_expert_bias=True))
    for ep in (2, 4):
        if world % ep == 0:
            cases[f"init/ep{ep}"] = lambda p=ep: init_case(p)
    for zero in (0, 2):
        cases[f"engine/ep{world}/zero{zero}"] = lambda z=zero: engine_case(world, z)
    return cases


CASES = build_cases(launch_world_size() or 1)
