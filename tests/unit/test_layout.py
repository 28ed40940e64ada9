"""ParallelLayout without processes: degrees, ranks and rank lists against DeepSpeed's own group
arithmetic (`_get_expert_parallel_ranks`, an independent implementation), validation messages,
and the mpu contract DeepSpeed reads."""
import itertools
import os

import pytest
from deepspeed.utils.groups import _get_expert_parallel_ranks

from megatron_selfroute.config import Config, ConfigError
from megatron_selfroute.parallel.layout import ParallelLayout


@pytest.mark.parametrize("world,tp,ep", [(1, 1, 1), (4, 1, 2), (8, 1, 4), (8, 2, 2), (16, 2, 4),
                                         (16, 4, 2), (12, 3, 2)])
def test_rank_lists_match_deepspeed(world, tp, ep):
    ep_groups, edp_groups = _get_expert_parallel_ranks(world, tp, ep)
    layout = ParallelLayout(world_size=world, tp=tp, ep=ep, moe=True)
    assert sorted(map(list, ep_groups)) == sorted(layout.ep_groups())
    if tp == 1:
        assert sorted(map(list, edp_groups)) == sorted(layout.edp_groups())
    else:  # DeepSpeed keeps each TP rank apart; here the group is every holder of the experts
        for tp_rank in range(tp):
            ds = sorted(g for g in map(list, edp_groups) if g[0] % tp == tp_rank)
            ours = sorted([r for r in g if r % tp == tp_rank] for g in layout.edp_groups())
            assert ds == ours
    holders = {}
    for r in range(world):
        experts = tuple(ParallelLayout(world_size=world, rank=r, tp=tp, ep=ep,
                                       moe=True).local_experts(8 * ep))
        holders.setdefault(experts, []).append(r)
    assert sorted(holders.values()) == sorted(layout.edp_groups())
    # every group family partitions the world
    for fam in (layout.tp_groups(), layout.dp_groups(), layout.ep_groups(), layout.edp_groups()):
        assert sorted(itertools.chain(*fam)) == list(range(world))
    # tensor-parallel ranks are adjacent (a TP group stays inside a node)
    assert all(g == list(range(g[0], g[0] + tp)) for g in layout.tp_groups())


def test_per_rank_coordinates_agree_with_the_groups():
    for rank in range(16):
        lay = ParallelLayout(world_size=16, rank=rank, tp=2, ep=4, moe=True)
        tp_g = next(g for g in lay.tp_groups() if rank in g)
        dp_g = next(g for g in lay.dp_groups() if rank in g)
        ep_g = next(g for g in lay.ep_groups() if rank in g)
        edp_g = next(g for g in lay.edp_groups() if rank in g)
        assert tp_g.index(rank) == lay.tp_rank == lay.get_tensor_model_parallel_rank()
        assert dp_g.index(rank) == lay.dp_rank == lay.get_data_parallel_rank()
        assert ep_g.index(rank) == lay.ep_rank and edp_g.index(rank) == lay.edp_rank
        assert lay.get_data_parallel_group_ranks() == dp_g
        assert lay.get_tensor_model_parallel_src_rank() == tp_g[0]
        assert (lay.dp, lay.edp, len(edp_g)) == (8, 2, 4)
        # this rank's experts are a contiguous block indexed by its expert-parallel rank
        assert list(lay.local_experts(8)) == [2 * lay.ep_rank, 2 * lay.ep_rank + 1]


def test_no_sequence_parallel_methods():
    """DeepSpeed reads get_sequence_parallel_* on an mpu as Ulysses sequence parallelism."""
    assert not [n for n in dir(ParallelLayout) if "sequence" in n]


def _cfg(**kw):
    cfg = Config()
    cfg.moe.num_experts = kw.pop("experts", 8)
    cfg.parallel.expert_model_parallel_size = kw.pop("ep", 1)
    cfg.train.micro_batch_size = kw.pop("mbs", 4)
    cfg.train.global_batch_size = kw.pop("gbs", None)
    return cfg


@pytest.mark.parametrize("world,kw,needle", [
    (6, dict(ep=4), "--expert-model-parallel-size 4 does not divide the 6 data-parallel"),
    (4, dict(ep=3, experts=9), "--expert-model-parallel-size 3 does not divide the 4"),
    (4, dict(ep=4, experts=6), "--num-experts 6 is not divisible by --expert-model-parallel-size"),
    (4, dict(gbs=24), "--global-batch-size 24 is not divisible by --micro-batch-size 4 x 4"),
])
def test_validation_names_the_flags(world, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ParallelLayout.from_config(_cfg(**kw), world_size=world, rank=0)


def test_valid_layouts_and_describe():
    lay = ParallelLayout.from_config(_cfg(ep=4, gbs=64), world_size=8, rank=5)
    assert lay.describe() == {"world": 8, "tp": 1, "dp": 8, "ep": 4, "edp": 2}
    assert (lay.ep_rank, lay.edp_rank, lay.expert_group_name) == (1, 1, "ep_size_4")
    assert str(lay) == "world 8 = TP 1 x DP 8; EP 4 x expert-DP 2"


def test_tensor_parallel_rules_name_the_flags():
    from megatron_selfroute.arguments import validate

    def tp_cfg(**kw):
        cfg = _cfg(experts=kw.pop("experts", 8))
        cfg.parallel.tensor_model_parallel_size = kw.pop("tp", 2)
        cfg.model.num_attention_heads = kw.pop("heads", 4)
        cfg.model.hidden_size = 96
        cfg.model.vocab_size = kw.pop("vocab", 50257)
        cfg.model.make_vocab_size_divisible_by = kw.pop("div", 128)
        for k, v in kw.items():
            setattr(cfg.moe if k.startswith("moe") else cfg.train, k, v)
        return cfg

    validate(tp_cfg(), 4)  # 50,257 pads to 50,304 = 2^7 x 3 x 131: T = 2 divides it
    odd = tp_cfg(micro_batch_size=1)
    odd.model.seq_length = 7
    with pytest.raises(ConfigError, match="7 tokens per micro-batch"):
        validate(odd, 4)
    cases = [(tp_cfg(heads=4, tp=8), 8, "--num-attention-heads 4 is not divisible by "
              "--tensor-model-parallel-size 8"),
             (tp_cfg(tp=2, div=1, vocab=127), 4, "the padded vocabulary 127"),
             (tp_cfg(micro_batch_size=1, tp=4), 4, None),
             (tp_cfg(moe_expert_capacity_factor=1.0), 4, "--moe-expert-capacity-factor with "
              "--tensor-model-parallel-size 2"),
             (tp_cfg(moe_token_dispatcher_type="deepspeed"), 4,
              "--moe-token-dispatcher-type deepspeed with --tensor-model-parallel-size 2")]
    for cfg, world, needle in cases:
        if needle is None:
            validate(cfg, world)
            continue
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            validate(cfg, world)
    with pytest.raises(ConfigError, match="does not divide the 6 processes"):
        validate(tp_cfg(tp=4), 6)
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 4 does not divide the 2 "
                                          "data-parallel processes"):
        cfg = tp_cfg()
        cfg.parallel.expert_model_parallel_size = 4
        validate(cfg, 4)


def test_build_groups_and_shutdown_forget_everything(tmp_path):
    """One real (gloo) process: the layout registers its expert groups with DeepSpeed; shutdown
    forgets them and DeepSpeed's mpu, so a later run in the same process starts afresh. Run in
    a subprocess: initialising torch.distributed here would leak launcher variables."""
    import subprocess
    import sys

    code = """
from deepspeed.utils import groups
from megatron_selfroute.config import Config
from megatron_selfroute.parallel.groups import shutdown
from megatron_selfroute.parallel.layout import ParallelLayout, init_distributed
cfg = Config(); cfg.moe.num_experts = 4
init_distributed("gloo")
layout = ParallelLayout.from_config(cfg).build_groups()
assert groups._get_expert_parallel_group("ep_size_1") is layout.ep_group is not None
groups.mpu = layout
shutdown()
assert groups.mpu is None and not groups._get_expert_parallel_group_dict()
print("ok")
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_tensor_degree_comes_from_the_config():
    cfg = _cfg()
    cfg.parallel.tensor_model_parallel_size = 2
    lay = ParallelLayout.from_config(cfg, world_size=4, rank=3, check=False)
    assert (lay.tp, lay.dp, lay.tp_rank, lay.dp_rank) == (2, 2, 1, 1)
    lay.validate(cfg)


def test_tensor_parallel_moe_rules_hold_for_a_vit_too():
    """A ViT has no vocabulary; its MoE layers still route 1/T of the tokens per TP rank, so the
    dispatcher and capacity rules apply to it as to a GPT, and fp16 is refused under TP."""
    from megatron_selfroute.arguments import validate

    cfg = _cfg()
    cfg.model.vocab_size = None
    cfg.model.num_attention_heads, cfg.model.hidden_size = 4, 64
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.moe.moe_token_dispatcher_type = "deepspeed"
    with pytest.raises(ConfigError, match="--moe-token-dispatcher-type deepspeed with"):
        validate(cfg, 2)
    cfg.moe.moe_token_dispatcher_type = "alltoall"
    cfg.moe.moe_expert_capacity_factor = 1.0
    with pytest.raises(ConfigError, match="--moe-expert-capacity-factor with"):
        validate(cfg, 2)
    cfg.moe.moe_expert_capacity_factor = None
    cfg.train.fp16 = True
    with pytest.raises(ConfigError, match="--fp16 with --tensor-model-parallel-size 2"):
        validate(cfg, 2)
