"""Golden runs: short fixed training runs whose per-iteration losses and final parameters were
recorded on the commit before the layout refactor (issue 14) and must not move.

Each run trains a tiny GPT or ViT for a few steps (dropout, accumulation, ZeRO and expert
parallelism on), saves its final checkpoint, and is summarised by
- its per-iteration training losses and validation losses, and
- per-parameter checksums (float64 sum and sum of absolute values) of the saved weights, read
  straight from DeepSpeed's files by `checksums` below (no project code involved), with expert
  weights under their global ids so every layout is comparable.

`python -m tests.golden.make_golden` records them; `tests/golden/test_golden.py` checks them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

# Recorded when the ZeRO-0 gradient norm accumulated every tensor's norm in float64, the only norm
# until 2026-12-02 and now --grad-norm-fp64 (the default accumulates in fp32, as Megatron does).
RECORDED_NUMERICS = ["--grad-norm-fp64"]
GPT_TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "2",
            "--eval-iters", "1", "--seed", "11", "--mock-data", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "127", "--hidden-dropout", "0.1",
            "--attention-dropout", "0.1", "--train-iters", "3", "--lr-warmup-iters", "1",
            *RECORDED_NUMERICS]
VIT_TINY = ["--img-size", "32", "--patch-size", "8", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--log-interval", "1", "--seed", "11",
            "--no-lr-scale", "--num-workers", "0", "--train-iters", "3", "--lr", "2e-3",
            "--warmup-epochs", "0.1", "--eval-iters", "1", *RECORDED_NUMERICS]
ROUTERS = ["self", "learned", "fixed-random", "random"]


def _moe(router: str | None) -> list[str]:
    return [] if router is None else ["--num-experts", "4", "--router-type", router]


def gpt_runs(world: int) -> dict[str, list[str]]:
    """name -> pretrain_gpt.py argv (without --save) for a `world`-process group."""
    if world == 1:
        layout = ["--micro-batch-size", "2", "--global-batch-size", "4"]  # 2 micro-batches
        runs = {f"gpt1/{r}": GPT_TINY + layout + _moe(r) for r in ROUTERS}
        runs["gpt1/dense"] = GPT_TINY + layout
        runs["gpt1/learned-deepspeed-capacity"] = GPT_TINY + layout + _moe("learned") + [
            "--moe-token-dispatcher-type", "deepspeed", "--moe-expert-capacity-factor", "1.0",
            "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"]
        runs["gpt1/self-zero0-clip"] = GPT_TINY + layout + _moe("self") + ["--clip-grad", "0.05"]
        return runs
    layout = ["--micro-batch-size", "1", "--global-batch-size", "4", "--zero-stage", "2"]
    ep = ["--expert-model-parallel-size", "2"]
    runs = {f"gpt2/{r}": GPT_TINY + layout + ep + _moe(r) for r in ROUTERS}
    runs["gpt2/dense"] = GPT_TINY + layout
    runs["gpt2/self-deepspeed"] = GPT_TINY + layout + ep + _moe("self") + [
        "--moe-token-dispatcher-type", "deepspeed"]
    runs["gpt2/learned-zero0-clip"] = (GPT_TINY + ["--micro-batch-size", "1",
                                                    "--global-batch-size", "4", "--clip-grad",
                                                    "0.05"] + ep + _moe("learned"))
    return runs


def vit_runs(world: int, image_root: str) -> dict[str, list[str]]:
    """name -> pretrain_vit.py argv (without --save) for a `world`-process group."""
    data = ["--data-path", image_root]
    if world == 1:
        layout = ["--batch-size", "4", "--global-batch-size", "8"]
        runs = {f"vit1/{r}": VIT_TINY + data + layout + _moe(r) for r in ROUTERS}
        runs["vit1/dense"] = VIT_TINY + data + layout
        runs["vit1/learned-ema"] = VIT_TINY + data + layout + _moe("learned") + [
            "--model-ema", "--model-ema-decay", "0.9"]
        return runs
    layout = ["--batch-size", "2", "--global-batch-size", "8", "--zero-stage", "2"]
    ep = ["--expert-model-parallel-size", "2"]
    runs = {f"vit2/{r}": VIT_TINY + data + layout + ep + _moe(r) for r in ROUTERS}
    runs["vit2/dense"] = VIT_TINY + data + layout
    return runs


_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")


def read_weights(save_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every saved tensor of the latest checkpoint in `save_dir`, read directly from DeepSpeed's
    files: the non-expert `module` dict plus each per-expert file (already global ids)."""
    save_dir = Path(save_dir)
    tag = (save_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    tag_dir = save_dir / tag
    main = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)
    sd = {k: v for k, v in main["module"].items() if torch.is_tensor(v)}
    for name in sorted(os.listdir(tag_dir)):
        if _EXPERT_FILE.fullmatch(name):
            part = torch.load(tag_dir / name, map_location="cpu", weights_only=True)
            sd.update(part)
    return sd


def checksums(save_dir: str | Path) -> dict[str, list[float]]:
    """name -> [float64 sum, float64 sum of |x|] of every saved tensor."""
    out = {}
    for name, t in sorted(read_weights(save_dir).items()):
        t = t.detach().to(torch.float64)
        out[name] = [t.sum().item(), t.abs().sum().item()]
    return out
