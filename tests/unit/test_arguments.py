"""Flags generated from the config, alias semantics, and every validation rule by its message."""
import pytest

from megatron_selfroute.arguments import (
    ConfigError,
    build_parser,
    namespace_to_config,
    parse_args,
    validate,
)

BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-experts", "4"]


def cfg_of(*flags):
    cfg, _ = parse_args(list(BASE) + list(flags))
    return cfg


def error_of(*flags, base=BASE):
    with pytest.raises(ConfigError) as e:
        parse_args(list(base) + list(flags))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_follow_the_paper():
    c = cfg_of()
    assert c.moe.moe_router_topk == 2 and c.moe.moe_aux_loss_coeff == 0.0
    assert c.moe.router_type == "self" and c.moe.moe_expert_capacity_factor is None
    assert c.moe.moe_token_dispatcher_type == "alltoall"
    assert c.moe.layer_pattern(4) == [1, 1, 1, 1]


def test_layer_freq_core_vs_megatron_deepspeed_interval():
    assert cfg_of("--moe-layer-freq", "2").moe.layer_pattern(4) == [1, 0, 1, 0]
    assert cfg_of("--expert-interval", "2").moe.layer_pattern(4) == [0, 1, 0, 1]
    assert cfg_of("--expert-interval", "1").moe.layer_pattern(4) == [1, 1, 1, 1]
    assert cfg_of("--moe-layer-freq", "[0,1]*2").moe.layer_pattern(4) == [0, 1, 0, 1]
    assert cfg_of("--moe-layer-freq", "([1]*1+[0])*2").moe.layer_pattern(4) == [1, 0, 1, 0]
    assert "--moe-layer-freq" in error_of("--moe-layer-freq", "[1,0]")
    assert "--moe-layer-freq" in error_of("--moe-layer-freq", "__import__('os')")
    assert "places no MoE layer" in error_of("--moe-layer-freq", "[0]*4")


def test_aliases_set_their_fields():
    assert cfg_of("--topk", "3").moe.moe_router_topk == 3
    assert cfg_of("--moe-loss-coeff", "0.01").moe.moe_aux_loss_coeff == 0.01
    assert cfg_of("--moe-expert-parallel-size", "2").parallel.expert_model_parallel_size == 2
    assert cfg_of("--moe-train-capacity-factor", "1.25").moe.moe_expert_capacity_factor == 1.25
    c = cfg_of("--disable-moe-token-dropping")
    assert c.moe.moe_expert_capacity_factor is None
    assert cfg_of("--moe-dispatcher", "deepspeed").moe.moe_token_dispatcher_type == "deepspeed"
    assert cfg_of("--deepspeed_config", "x.json").parallel.deepspeed_config == "x.json"
    assert cfg_of("--deepspeed-config", "y.json").parallel.deepspeed_config == "y.json"
    assert cfg_of("--deepspeed", "--local_rank", "3").parallel.local_rank == 3
    assert cfg_of("--local-rank", "1").parallel.local_rank == 1


def test_alias_conflicts_are_errors():
    assert "--topk 3 conflicts with --moe-router-topk 2" in error_of(
        "--moe-router-topk", "2", "--topk", "3")
    msg = error_of("--moe-train-capacity-factor", "1.0", "--disable-moe-token-dropping")
    assert "--disable-moe-token-dropping" in msg
    assert "--expert-interval" in error_of("--moe-layer-freq", "1", "--expert-interval", "2")


@pytest.mark.parametrize("flags,needle", [
    (["--hidden-size", "30"], "--num-attention-heads 4 does not divide --hidden-size 30"),
    (["--num-experts", "40"], "--num-experts 40 <= --hidden-size 32"),
    (["--num-experts", "16", "--self-route-dims", "per-layer"],
     "--num-experts 16 x 4 MoE layers = 64"),
    (["--num-experts", "12", "--self-route-dims", "per-layer"], "<= --hidden-size 32"),
    (["--moe-router-topk", "0"], "--moe-router-topk 0 must be between 1 and --num-experts 4"),
    (["--moe-router-topk", "5"], "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--moe-router-topk", "1", "--router-type", "learned"], "--moe-router-pre-softmax"),
    (["--moe-router-topk", "1"], "--moe-router-pre-softmax"),
    (["--router-type", "sinkhorn"], "--router-type 'sinkhorn' is unknown"),
    (["--expert-model-parallel-size", "3"],
     "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
    (["--zero-stage", "3"], "--zero-stage 3"),
    (["--bf16", "--fp16"], "--bf16 and --fp16"),
    (["--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor must be > 0"),
    (["--router-type", "learned", "--self-route-dims", "first"], "--self-route-dims first"),
    (["--fixed-random-shared"], "--fixed-random-shared"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout"),
    (["--train-iters", "5", "--train-samples", "10"], "mutually exclusive"),
    # issue 16: routers and balancing
    (["--router-type", "hash", "--moe-router-pre-softmax"],
     "--moe-router-pre-softmax does not apply to --router-type hash"),
    (["--router-type", "hash", "--moe-router-enable-expert-bias"],
     "--moe-router-enable-expert-bias does not apply to --router-type hash"),
    (["--router-type", "hash", "--moe-aux-loss-coeff", "0.01"], "--moe-aux-loss-coeff 0.01"),
    (["--router-type", "learned", "--hash-shared"],
     "--hash-shared applies only to --router-type hash"),
    (["--hash-assignment", "balanced"], "--hash-assignment balanced applies only to"),
    (["--moe-router-score-function", "sigmoid", "--moe-router-topk", "1"],
     "--moe-router-score-function sigmoid with --moe-router-topk 1"),
    (["--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"],
     "mutually exclusive"),
    (["--moe-router-bias-update-rate", "0.01"], "needs --moe-router-enable-expert-bias"),
    (["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "-1"],
     "--moe-router-bias-update-rate must be > 0"),
    (["--moe-shared-expert-intermediate-size", "0"],
     "--moe-shared-expert-intermediate-size must be >= 1"),
    (["--router-type", "fixed-random", "--fixed-random-init", "orthogonal", "--num-experts",
      "40"], "--fixed-random-init orthogonal needs --num-experts 40 <= --hidden-size 32"),
    (["--router-type", "learned", "--fixed-random-init", "orthogonal"],
     "--fixed-random-init orthogonal applies only to --router-type fixed-random"),
])
def test_validation_messages(flags, needle):
    assert needle in error_of(*flags)


def test_valid_corner_cases_pass():
    cfg_of("--moe-router-topk", "1", "--router-type", "random")  # not trainable: allowed
    cfg_of("--moe-router-topk", "1", "--moe-router-pre-softmax", "--router-type", "learned")
    cfg_of("--num-experts", "8", "--self-route-dims", "per-layer")  # 8 x 4 == 32 fits exactly
    cfg_of("--num-experts", "32")  # N == H is allowed
    cfg_of("--router-type", "hash", "--moe-router-topk", "1")  # weights 1/k: nothing to train
    cfg_of("--router-type", "self", "--moe-router-enable-expert-bias")
    cfg_of("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
           "--moe-router-bias-update-rate", "0.01", "--router-type", "learned")


def test_global_batch_divisibility_names_flags():
    c = cfg_of("--micro-batch-size", "4", "--global-batch-size", "12")
    with pytest.raises(ConfigError, match="--global-batch-size 12 is not divisible"):
        validate(c, world_size=2)
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 4 does not divide"):
        validate(cfg_of("--expert-model-parallel-size", "4"), world_size=2)


def test_every_field_has_a_flag():
    from dataclasses import fields

    from megatron_selfroute.config import SECTIONS

    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"{sec}.{f.name}" in dests
    ns = parser.parse_args(["--data-path", "0.3", "A", "0.7", "B", "--lr", "1e-3"])
    c = namespace_to_config(ns)
    assert c.data.data_path == ["0.3", "A", "0.7", "B"] and c.train.lr == 1e-3
