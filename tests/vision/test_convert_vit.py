"""ViT checkpoints through the converters (the ViT state-dict adapter), starting from a checkpoint
written before the refactor (tests/assets/ckpt_pre_layout/vit_1proc_self): to consolidated and
to another expert-parallel layout with every tensor intact (read back from DeepSpeed's files
directly), a converted checkpoint trains exactly like the original, and the Hugging Face export
is refused in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.distributed.harness import run_argv_cases
from tests.golden.make_golden import asset_argv
from tests.golden.runs import read_weights
from tests.integration.helpers import run_tool

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ckpt_pre_layout" / "vit_1proc_self"
META = json.loads((ASSET.parent / "assets.json").read_text())["assets"]["vit_1proc_self"]


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k, v in b.items():
        assert torch.equal(a[k], v), k


def test_vit_checkpoint_converts_and_trains_like_the_original(tmp_path, image_root):
    want = read_weights(ASSET)
    run_tool("checkpoint/convert.py", "--input", str(ASSET), "--output", str(tmp_path / "c"),
             "--to", "consolidated")
    from safetensors.torch import load_file

    _same(load_file(tmp_path / "c" / "model.safetensors"), want)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_family"] == "vit" and config["shape_config"]["img_size"] == 32
    run_tool("checkpoint/convert.py", "--input", str(tmp_path / "c"), "--output",
             str(tmp_path / "ep2"), "--to", "deepspeed", "--expert-model-parallel-size", "2")
    _same(read_weights(tmp_path / "ep2"), want)
    run_tool("checkpoint/convert.py", "--input", str(ASSET), "--output", str(tmp_path / "ep1"),
             "--to", "deepspeed")
    hf = run_tool("checkpoint/convert.py", "--input", str(ASSET), "--output",
                  str(tmp_path / "hf"), "--to", "hf", check=False)
    assert hf.returncode == 1 and "a vit checkpoint has no Hugging Face export" in hf.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())

    # the original and the converted checkpoint resume the same weights at the same data
    # position with a fresh optimizer: identical losses
    shutil.copytree(ASSET, tmp_path / "orig")
    base = ["vit", *asset_argv("vit", META["argv"], str(image_root)), "--no-load-optim",
            "--no-load-rng"]
    runs = run_argv_cases(tmp_path / "logs", 1, "tests.golden.cases", "MSR_GOLDEN_ARGV",
                          [base + ["--load", str(tmp_path / "orig")],
                           base + ["--load", str(tmp_path / "ep1")]])
    assert sorted(runs[0]["losses"]) == ["3", "4"]
    assert runs[0]["losses"] == runs[1]["losses"], runs


def test_routing_analysis_of_a_vit_checkpoint(tmp_path, image_root):
    """tools/analyze_routing.py on the ViT checkpoint counts what a hand computation from the
    post-LayerNorm hidden states gives (self-routing: top-2 of the last 4 coordinates)."""
    from megatron_selfroute.checkpoint.consolidated import build_model, load_checkpoint
    from megatron_selfroute.data import vision

    tokens = 12 * 17  # 12 of the 16 validation images, 4x4 patches + the class token each
    run_tool("analyze_routing.py", "--load", str(ASSET), "--labels", "vit", "--data-path",
             str(image_root), "--tokens", str(tokens), "--output-dir", str(tmp_path / "out"),
             "--no-progress", "--batch-size", "5")
    result = json.loads((tmp_path / "out" / "routing.json").read_text())[0]
    model = build_model(load_checkpoint(str(ASSET)), str(ASSET))
    seen = []
    moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
    for i in moe_blocks:
        model.blocks[i].ln_2.register_forward_hook(lambda mod, inp, out: seen.append(out))
    source = vision.open_images(str(image_root), None, "val")
    transform = vision.eval_transform(32)
    want = torch.zeros(len(moe_blocks), 4, dtype=torch.int64)
    with torch.no_grad():
        for i in range(tokens // 17):
            seen.clear()
            model(transform(source.load(i)[0]).unsqueeze(0))
            for layer, h in enumerate(seen):
                top = torch.topk(h.reshape(-1, 32)[:, -4:], 2, dim=-1).indices
                want[layer] += torch.bincount(top.reshape(-1), minlength=4)
    assert result["blocks"] == moe_blocks and result["tokens"] == tokens
    assert result["counts"] == want.tolist()
    assert (tmp_path / "out" / "entropy.png").is_file()
