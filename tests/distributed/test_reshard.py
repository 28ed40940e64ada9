"""Checkpoints move between layouts with their optimizer state (issue 20, part 5).

A TP = 2 x EP = 2 run on 4 processes (ZeRO-2) is saved at step 2. Converted through the
consolidated form (with `optimizer.safetensors`) to TP = 1 x EP = 1 on one process (ZeRO-0: the
torch optimizer's own state), and from there straight back to TP = 2 x EP = 2 (ZeRO-2, DeepSpeed's
flat partitions), each resumed run gives the unconverted run's steps 3 and 4; a resume that drops
the optimizer state (the converter's old behaviour) does not, so the test sees the moments. The
three checkpoints give the same logits, and the round trip returns every master weight and moment
unchanged. A bf16 ZeRO-0 run (DeepSpeed's unfused wrapper, fp32 masters apart from the bf16
weights) goes through the same path. Every conversion runs as a user runs it:
`tools/checkpoint/convert.py` in its own process, which starts the layout's CPU world itself.
"""
import math

import torch

from tests.distributed.test_tensor_parallel import ENGINE
from tests.distributed.train_cases import run_layout
from tests.integration.helpers import run_tool

BASE = ENGINE + ["--router-type", "learned", "--global-batch-size", "8",
                 "--moe-aux-loss-coeff", "1e-2"]
FOUR = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]


def _convert(src, out, *flags):
    proc = run_tool("checkpoint/convert.py", "--input", str(src), "--output", str(out), *flags)
    print(proc.stdout.strip().splitlines()[-1])
    return proc


def _logits(path):
    from megatron_selfroute.checkpoint.consolidated import load_model

    model, cfg = load_model(str(path))
    tokens = torch.arange(2 * cfg.model.seq_length).view(2, -1) % cfg.model.vocab_size
    with torch.no_grad():
        return model(tokens).logits


def _optimizer(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        header = f.metadata()
    return load_file(str(path / "optimizer.safetensors")), header


def _close(got, want, tol):
    assert sorted(got, key=int) == ["3", "4"], got
    for it in ("3", "4"):
        assert math.isclose(got[it], want[it], rel_tol=tol), (it, got, want)


def test_tp2_ep2_checkpoint_moves_to_one_process_and_back_with_its_optimizer(tmp_path):
    zero2 = BASE + ["--zero-stage", "2"]
    save = tmp_path / "save"
    # one run: its step-2 checkpoint is converted, its steps 3 and 4 are what resumes must give
    (straight,) = run_layout(tmp_path / "four", 4, [
        zero2 + FOUR + ["--save", str(save), "--save-interval", "2"]])
    ck = save / "iter_0000002"  # convert.py takes a tag directory too
    want = straight["losses"]

    # tools/checkpoint/verify.py knows a TP checkpoint's files without its manifest
    import shutil

    old = tmp_path / "old_style" / "iter_0000002"
    shutil.copytree(ck, old)
    (old / "manifest.json").unlink()
    (old / "layer_1_expert_3_mp_rank_01_model_states.pt").unlink()
    report = run_tool("checkpoint/verify.py", str(old), check=False)
    assert report.returncode == 1 and "layer_1_expert_3_mp_rank_01_model_states.pt: missing" in \
        report.stdout, report.stdout + report.stderr

    _convert(ck, tmp_path / "c", "--to", "consolidated", "--optimizer-state")
    _convert(tmp_path / "c", tmp_path / "one", "--to", "deepspeed", "--optimizer-state",
             "--zero-stage", "0")
    _convert(tmp_path / "one", tmp_path / "back", "--to", "deepspeed", "--optimizer-state",
             *FOUR, "--world-size", "4", "--zero-stage", "2")
    weights_only = tmp_path / "one_weights"  # the conversion without --optimizer-state
    _convert(tmp_path / "c", weights_only, "--to", "deepspeed")
    # weights only, tensor-parallel: written by a TP = 2 world's own engine
    _convert(tmp_path / "c", tmp_path / "tp2_weights", "--to", "deepspeed",
             "--tensor-model-parallel-size", "2")

    one, fresh = run_layout(tmp_path / "resume_one", 1, [
        BASE + ["--zero-stage", "0", "--load", str(tmp_path / "one")],
        BASE + ["--zero-stage", "0", "--load", str(weights_only), "--no-load-optim"]])
    (back,) = run_layout(tmp_path / "resume_back", 4, [zero2 + FOUR + ["--load",
                                                                       str(tmp_path / "back")]])
    print("straight", want, "\none", one["losses"], "\nback", back["losses"], "\nfresh Adam",
          fresh["losses"])
    _close(one["losses"], want, 1e-5)  # another layout: another summation order
    _close(back["losses"], want, 1e-6)
    # without the moments the same weights continue differently (the test sees them)
    assert abs(fresh["losses"]["4"] - want["4"]) > 1e-4, (fresh, want)

    ref = _logits(ck)
    for path in (tmp_path / "c", tmp_path / "one", tmp_path / "back", tmp_path / "tp2_weights"):
        assert torch.allclose(_logits(path), ref, rtol=0, atol=1e-6), path

    # the round trip TP2xEP2 -> TP1 -> TP2xEP2 returns every master and moment unchanged
    _convert(tmp_path / "back", tmp_path / "c2", "--to", "consolidated", "--optimizer-state")
    a, head_a = _optimizer(tmp_path / "c")
    b, head_b = _optimizer(tmp_path / "c2")
    assert set(a) == set(b) and any(k.endswith("::exp_avg_sq") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert head_a["step"] == head_b["step"] == "2", (head_a, head_b)
    assert head_a["iteration"] == "2" and head_a["consumed_train_samples"] == "16", head_a


def test_bf16_zero0_checkpoint_carries_its_fp32_masters(tmp_path):
    """bf16 ZeRO-0 keeps fp32 masters apart from the bf16 weights (DeepSpeed's unfused
    wrapper): they, not the rounded weights, come through a conversion, and the resumed run
    continues the straight one; converted to fp32 (`--precision fp32`) it keeps every master
    and moment and continues within bf16's rounding."""
    run = BASE + ["--bf16", "--global-batch-size", "4"]
    ck = tmp_path / "ck"
    straight, _ = run_layout(tmp_path / "runs", 1, [
        run, run + ["--save", str(ck), "--save-interval", "2", "--exit-interval", "2"]])
    _convert(ck, tmp_path / "c", "--to", "consolidated", "--optimizer-state")
    _convert(tmp_path / "c", tmp_path / "ds", "--to", "deepspeed", "--optimizer-state")
    # --precision fp32: the same masters and moments, now trained in fp32
    _convert(ck, tmp_path / "fp32", "--to", "deepspeed", "--optimizer-state", "--precision",
             "fp32")
    fp32_run = [a for a in run if a != "--bf16"]
    resumed, in_fp32 = run_layout(tmp_path / "resume", 1, [
        run + ["--load", str(tmp_path / "ds")], fp32_run + ["--load", str(tmp_path / "fp32")]])
    print("straight", straight["losses"], "\nresumed", resumed["losses"], "\nfp32",
          in_fp32["losses"])
    _close(resumed["losses"], straight["losses"], 1e-6)
    _close(in_fp32["losses"], straight["losses"], 1e-2)  # bf16 rounding apart
    _convert(tmp_path / "fp32", tmp_path / "c32", "--to", "consolidated", "--optimizer-state")
    again, _ = _optimizer(tmp_path / "c32")
    first, _ = _optimizer(tmp_path / "c")
    for k in first:  # masters and moments carried across the precision change bit for bit
        assert torch.equal(first[k], again[k]), k
    opt, _ = _optimizer(tmp_path / "c")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    master = opt[f"{name}::master"]
    assert master.dtype == torch.float32
    assert not torch.equal(master, master.to(torch.bfloat16).float())  # finer than bf16
    assert torch.equal(master.to(torch.bfloat16), weights[name].to(torch.bfloat16))
