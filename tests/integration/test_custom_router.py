"""A router added in this file alone (no project file edited) trains on 2 processes with EP=2 and
ZeRO-2, saves, resumes exactly, converts, is validated, counted and refused by the Hugging Face
export through the facts its class declares.

This module is also the harness worker of its runs: importing it registers the router in every
rank's process.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from megatron_selfroute.arguments import build_parser, namespace_to_config, validate
from megatron_selfroute.config import ConfigError
from megatron_selfroute.models.gpt import GPTModel, gpt_flops_per_token, num_parameters
from megatron_selfroute.moe.context import RoutingContext
from megatron_selfroute.moe.router import ROUTERS, Router, register_router
from tests.distributed.harness import argv_cases, run_argv_cases
from tests.distributed.train_cases import MOCK, TINY
from tests.golden.runs import read_weights
from tests.integration.helpers import run_main

NAME = "test-scaled-first"


@register_router(NAME)
class ScaledFirstRouter(Router):
    """Logits = the first E hidden coordinates times a learned per-expert scale."""

    hf_refusal = "is a test router with no Hugging Face form"

    def __init__(self, cfg, hidden_size, layer_number, moe_index, seed=0, init_std=0.02):
        super().__init__(cfg, hidden_size, layer_number, moe_index, seed, init_std)
        self.scale = nn.Parameter(torch.ones(self.num_experts))

    @classmethod
    def check(cls, cfg, num_moe_layers: int) -> None:
        if cfg.moe.num_experts > cfg.model.hidden_size:
            raise ConfigError(f"--router-type {NAME} needs --num-experts <= --hidden-size")

    @classmethod
    def learned_parameters(cls, hidden_size: int, num_experts: int) -> int:
        return num_experts

    @classmethod
    def flops_per_token(cls, hidden_size: int, num_experts: int) -> float:
        return float(num_experts)

    def logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        return x_TD[:, :self.num_experts].float() * self.scale.float()


def run(argv: list[str]) -> dict:
    import pretrain_gpt

    result = pretrain_gpt.main(TINY + MOCK + argv)
    return {"losses": {str(k): v for k, v in result.losses.items()},
            "iteration": result.iteration}


CASES = argv_cases("MSR_CUSTOM_ARGV", run)
EP2 = ["--router-type", NAME, "--expert-model-parallel-size", "2", "--zero-stage", "2",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
       "--hidden-dropout", "0.1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom_router")
    straight, part = tmp / "straight", tmp / "part"
    argvs = [EP2 + ["--save", str(straight)],
             EP2 + ["--save", str(part), "--exit-interval", "2"],
             EP2 + ["--load", str(part), "--save", str(part)]]
    results = run_argv_cases(tmp / "logs", 2, "tests.integration.test_custom_router",
                             "MSR_CUSTOM_ARGV", argvs)
    return results, straight, tmp


def _cfg(*flags: str):
    cfg = namespace_to_config(build_parser().parse_args(TINY + MOCK + list(flags)))
    validate(cfg, 2)
    return cfg


def test_trains_saves_and_resumes_exactly(runs):
    (straight, first, resumed), ckpt, _ = runs
    assert first["iteration"] == 2 and sorted(resumed["losses"]) == ["3", "4"]
    for it in ("3", "4"):
        assert resumed["losses"][it] == straight["losses"][it], (it, resumed, straight)
    # its parameter was trained and saved (both MoE layers), not left at its initial value
    weights = read_weights(ckpt)
    initial = dict(GPTModel(_cfg(*EP2)).named_parameters())
    for block in (0, 1):
        name = f"transformer.h.{block}.mlp.router.scale"
        assert weights[name].shape == (4,)
        assert not torch.equal(weights[name], initial[name].detach()), name


def test_converts_to_consolidated_and_refuses_hf(runs, tmp_path):
    _, ckpt, _ = runs
    out = tmp_path / "consolidated"
    code, _, err = run_main("checkpoint/convert.py", "--input", str(ckpt), "--output", str(out),
                            "--to", "consolidated")
    assert code == 0, err
    from safetensors.torch import load_file

    got, want = load_file(out / "model.safetensors"), read_weights(ckpt)
    want.pop("lm_head.weight", None)  # tied
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    code, _, err = run_main("checkpoint/convert.py", "--input", str(out), "--output",
                            str(tmp_path / "hf"), "--to", "hf")
    assert code == 1 and f"router type '{NAME}' is a test router with no Hugging Face form" in err


def test_facts_are_read_from_the_class():
    assert NAME in ROUTERS
    custom, self_cfg = _cfg("--router-type", NAME), _cfg("--router-type", "self")
    assert (num_parameters(GPTModel(custom, init=False))
            - num_parameters(GPTModel(self_cfg, init=False))) == 2 * 4
    assert gpt_flops_per_token(custom) - gpt_flops_per_token(self_cfg) == 2 * 4.0
    with pytest.raises(ConfigError, match=f"--router-type {NAME} needs --num-experts"):
        _cfg("--router-type", NAME, "--num-experts", "40")
    with pytest.raises(ConfigError, match=f"applies only to --router-type self, not {NAME}"):
        _cfg("--router-type", NAME, "--self-route-dims", "first")
