"""Checkpoint conversion against independent references (transformers, DeepSpeed resume).

- consolidated -> Hugging Face -> transformers' logits equal ours (dense: plain GPT2LMHeadModel;
  MoE: the remote-code model) for every router and layer option, and the export imports back;
- a random transformers GPT2LMHeadModel -> import -> our logits equal its own;
- a 2-process EP=2 ZeRO-2 training run -> consolidated -> EP=1 -> EP=2 keeps the logits, and
  `pretrain_gpt.py --load --no-load-optim` resumes a converted checkpoint with all its weights;
- a perturbed fixed-random router buffer survives every conversion;
- pickles carrying code are refused without running it, with a one-line error.
"""
from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_selfroute.checkpoint import CheckpointFormatError
from megatron_selfroute.checkpoint.consolidated import load_checkpoint, load_model
from megatron_selfroute.checkpoint.hf_export import export_hf
from tests.distributed.harness import check, spawn
from tests.integration.helpers import (
    ROOT,
    random_model,
    run_main,
    run_tool,
    save_model,
    tiny_config,
)

VOCAB = 100  # padded to 128: padding rows must be sliced off and restored

CASES = {
    "dense": (None, {}, {}),
    "dense-nobias-erf-untied": (None, {"disable_bias_linear": True,
                                       "disable_bias_layernorm": True,
                                       "gelu_approximation": "none",
                                       "untie_embeddings_and_output_weights": True}, {}),
    "self": ("self", {}, {}),
    "self-perlayer-presoftmax": ("self", {}, {"self_route_dims": "per-layer",
                                              "moe_router_pre_softmax": True}),
    "self-mixed-nobias": ("self", {"disable_bias_linear": True}, {"moe_layer_freq": "[0,1]"}),
    "learned": ("learned", {}, {}),
    "fixed-random-untied": ("fixed-random", {"untie_embeddings_and_output_weights": True}, {}),
    # issue 16: the routers and balancing options with a Hugging Face form
    "hash-shared": ("hash", {}, {"hash_shared": True, "moe_router_topk": 3}),
    "learned-sigmoid-bias-shared": ("learned", {}, {"moe_router_score_function": "sigmoid",
                                                    "moe_router_enable_expert_bias": True,
                                                    "moe_shared_expert_intermediate_size": 24}),
    "self-bias-presoftmax": ("self", {}, {"moe_router_enable_expert_bias": True,
                                          "moe_router_pre_softmax": True}),
    "fixed-random-orthogonal": ("fixed-random", {}, {"fixed_random_init": "orthogonal"}),
}


def make_model(case: str, seed: int = 0):
    router, model_kw, moe_kw = CASES[case]
    cfg = tiny_config(router, vocab=VOCAB, **model_kw)
    for k, v in moe_kw.items():
        setattr(cfg.moe, k, v)
    return random_model(cfg, seed=seed)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_hf_export_equals_transformers(tmp_path, case):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    ours = make_model(case)
    ckpt = save_model(ours, tmp_path / "c")
    export_hf(load_checkpoint(str(ckpt)), str(tmp_path / "hf"), str(ckpt))
    moe = CASES[case][0] is not None
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=moe).eval()
    assert isinstance(hf, GPT2LMHeadModel) != moe
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    want = logits(ours, ids)
    assert want.shape == (3, 16, VOCAB)
    torch.testing.assert_close(logits(hf, ids), want, atol=2e-5, rtol=1e-5)
    # and the export imports back to the same function
    back, _ = load_model(str(tmp_path / "hf"))
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)


def test_import_hf_gpt2_equals_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=24, n_embd=48, n_layer=2,
                                    n_head=4)).eval()
    with torch.no_grad():  # biases and LayerNorms are trivially initialised: make them count
        for n, p in hf.named_parameters():
            if n.endswith("bias") or ".ln_" in n or "ln_f" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "full")
    # the official `gpt2` files: the base GPT2Model's names (no `transformer.`, no lm_head)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in hf.transformer.state_dict().items()},
              str(tmp_path / "base" / "model.safetensors"))
    hf.config.to_json_file(str(tmp_path / "base" / "config.json"))
    ids = torch.randint(0, 101, (2, 24))
    want = logits(hf, ids)
    for src in ("full", "base"):
        code, out, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / src),
                                  "--output", str(tmp_path / f"{src}_c"), "--to", "consolidated")
        assert code == 0, err
        ours, cfg = load_model(str(tmp_path / f"{src}_c"))
        assert cfg.model.padded_vocab_size == 128 and cfg.model.gelu_approximation == "tanh"
        torch.testing.assert_close(logits(ours, ids), want, atol=2e-5, rtol=1e-5)
    # and back out: transformers gets exactly its own weights
    code, _, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / "base_c"),
                            "--output", str(tmp_path / "again"), "--to", "hf")
    assert code == 0, err
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "again")
    for name, t in hf.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["fixed-random-untied", "self-mixed-nobias", "hash-shared",
                                  "learned-sigmoid-bias-shared"])
def test_every_conversion_keeps_every_tensor(tmp_path, case):
    """consolidated -> DeepSpeed EP=2 -> consolidated -> HF -> consolidated: all tensors equal
    (padded vocabulary rows aside), including a perturbed fixed-random router projection."""
    model = make_model(case, seed=4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if CASES[case][0] == "fixed-random":  # the checkpoint's projection, not a regenerated one
        fresh = dict(random_model(model.cfg, seed=4, scale=0.0).named_buffers())
        assert {n for n in fresh if n.endswith("router.proj")} == {
            f"transformer.h.{i}.mlp.router.proj" for i in (0, 1)}
        assert all(not torch.equal(sd[n], fresh[n]) for n in fresh)
    steps = [("c0", None), ("ds2", "deepspeed"), ("c1", "consolidated"), ("hf", "hf"),
             ("c2", "consolidated")]
    save_model(model, tmp_path / "c0")
    ids = torch.randint(0, VOCAB, (2, 16))
    want = logits(model, ids)
    for (prev, _), (name, kind) in zip(steps[:-1], steps[1:], strict=True):
        extra = ["--expert-model-parallel-size", "2"] if kind == "deepspeed" else []
        code, _, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / prev),
                                "--output", str(tmp_path / name), "--to", kind, *extra)
        assert code == 0, err
        loaded, _ = load_model(str(tmp_path / name))
        got = loaded.state_dict()
        assert set(got) == set(sd)
        for n, t in sd.items():
            rows = VOCAB if n in ("transformer.wte.weight", "lm_head.weight") else None
            assert torch.equal(got[n][:rows], t[:rows]), (name, n)
        torch.testing.assert_close(logits(loaded, ids), want, atol=0, rtol=0)


def _pretrain(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_gpt.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_converted_checkpoint_resumes_in_pretrain_gpt(tmp_path):
    """The DeepSpeed engine loads every converted weight and buffer: a resumed step at lr 0
    saves exactly the weights it was given (not the seed's initialisation)."""
    model = make_model("fixed-random-untied", seed=5)
    save_model(model, tmp_path / "c", iteration=3)
    code, _, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / "c"), "--output",
                            str(tmp_path / "ds"), "--to", "deepspeed")
    assert code == 0, err
    _pretrain("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
              "--seq-length", "16", "--num-experts", "4", "--router-type", "fixed-random",
              "--untie-embeddings-and-output-weights", "--tokenizer-type", "NullTokenizer",
              "--vocab-size", str(VOCAB), "--mock-data", "--micro-batch-size", "2",
              "--train-iters", "4", "--lr", "0", "--min-lr", "0", "--zero-stage", "1",
              "--load", str(tmp_path / "ds"), "--no-load-optim", "--save", str(tmp_path / "out"))
    resumed = load_checkpoint(str(tmp_path / "out"))
    assert resumed.meta["iteration"] == 4
    for name, t in load_checkpoint(str(tmp_path / "c")).state_dict.items():
        assert torch.equal(resumed.state_dict[name], t), name


def _train_ep2(out_dir, save_dir) -> None:
    argv = ["--mock-data", "--micro-batch-size", "2", "--train-iters", "2", "--router-type",
            "learned", "--expert-model-parallel-size", "2", "--zero-stage", "2",
            "--save", str(save_dir)]
    check(spawn(2, "tests.distributed.train_cases", ["argv0"], out_dir,
                env={"MSR_ARGV0": "\x1f".join(argv)}), "argv0")


def test_ep2_training_reshards_to_ep1_and_back(tmp_path):
    _train_ep2(tmp_path / "logs", tmp_path / "train")
    ids = torch.randint(0, 128, (2, 16))
    reference, cfg = load_model(str(tmp_path / "train"))  # read straight from DeepSpeed files
    assert cfg.parallel.expert_model_parallel_size == 1 and len(reference.moe_layers) == 2
    want = logits(reference, ids)
    steps = [("train", None, []), ("c", "consolidated", []),
             ("ep1", "deepspeed", ["--expert-model-parallel-size", "1"]),
             ("ep2", "deepspeed", ["--expert-model-parallel-size", "2"])]
    for (prev, _, _), (name, kind, extra) in zip(steps[:-1], steps[1:], strict=True):
        code, _, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / prev),
                                "--output", str(tmp_path / name), "--to", kind, *extra)
        assert code == 0, err
        loaded, _ = load_model(str(tmp_path / name))
        torch.testing.assert_close(logits(loaded, ids), want, atol=0, rtol=0)
    tag = tmp_path / "ep2" / "iter_0000002"
    state = json.loads((tag / "run_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallel"][
        "expert_model_parallel_size"] == 2
    assert len(list(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 8
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json",
                                                                  "model.safetensors"]


@pytest.mark.slow
def test_ep2_converted_checkpoint_resumes_on_two_processes(tmp_path):
    model = make_model("learned", seed=6)
    save_model(model, tmp_path / "c", iteration=1)
    code, _, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / "c"), "--output",
                            str(tmp_path / "ds"), "--to", "deepspeed",
                            "--expert-model-parallel-size", "2")
    assert code == 0, err
    argv = ["--mock-data", "--micro-batch-size", "2", "--train-iters", "2", "--router-type",
            "learned", "--vocab-size", str(VOCAB), "--expert-model-parallel-size", "2",
            "--zero-stage", "2", "--lr", "0", "--min-lr", "0", "--load", str(tmp_path / "ds"),
            "--no-load-optim", "--save", str(tmp_path / "out")]
    check(spawn(2, "tests.distributed.train_cases", ["argv0"], tmp_path / "logs",
                env={"MSR_ARGV0": "\x1f".join(argv)}), "argv0")
    resumed = load_checkpoint(str(tmp_path / "out")).state_dict
    for name, t in load_checkpoint(str(tmp_path / "c")).state_dict.items():
        assert torch.equal(resumed[name], t), name


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["deepspeed", "hf_bin"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "PWNED"
    src = tmp_path / "src"
    src.mkdir()
    if where == "deepspeed":
        (src / "run_state.json").write_text(json.dumps(
            {"iteration": 1, "world_size": 1, "config": tiny_config().to_dict()}))
        target = src / "mp_rank_00_model_states.pt"
    else:
        (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1,
                                                     "n_embd": 8, "n_head": 2,
                                                     "vocab_size": 10}))
        target = src / "pytorch_model.bin"
    torch.save({"module": _Payload(str(marker))}, target)
    args = ("--input", str(src), "--output", str(tmp_path / "out"), "--to", "consolidated")
    if where == "deepspeed":  # a real process: exit status and the whole stderr
        proc = run_tool("checkpoint/convert.py", *args, check=False)
        code, err = proc.returncode, proc.stderr
    else:
        code, _, err = run_main("checkpoint/convert.py", *args)
    assert code == 1 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert str(target) in err and "refused" in err
    with pytest.raises(CheckpointFormatError, match="refused"):
        load_model(str(src))
    assert not marker.exists()


def test_cli_errors_are_one_line(tmp_path):
    model = make_model("self")
    save_model(model, tmp_path / "c")
    random_cfg = tiny_config("random", vocab=VOCAB)
    save_model(random_model(random_cfg), tmp_path / "rand")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["--input", str(tmp_path / "c"), "--output", str(tmp_path / "full"), "--to", "hf"],
         "exists and is not empty"),
        (["--input", str(tmp_path / "rand"), "--output", str(tmp_path / "o1"), "--to", "hf"],
         "router type 'random' cannot be exported"),
        (["--input", str(tmp_path / "c"), "--output", str(tmp_path / "o2"), "--to", "deepspeed",
          "--expert-model-parallel-size", "3"], "does not divide the 4 experts"),
        (["--input", str(tmp_path / "none"), "--output", str(tmp_path / "o3"), "--to", "hf"],
         "no such checkpoint directory"),
        (["--input", str(tmp_path / "c"), "--output", str(tmp_path / "o4"), "--to", "hf",
          "--optimizer-state"], "a Hugging Face export holds weights only"),
        (["--input", str(tmp_path / "c"), "--output", str(tmp_path / "o5"), "--to", "deepspeed",
          "--optimizer-state"], "holds no optimizer state"),
        (["--input", str(tmp_path / "c"), "--output", str(tmp_path / "o6"), "--to", "deepspeed",
          "--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3"),
    ]
    for args, message in cases:
        code, _, err = run_main("checkpoint/convert.py", *args)
        assert code == 1 and message in err and err.strip().count("\n") == 0, err
    # a failed conversion leaves nothing behind it created, and keeps what was there
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5", "o6"))
    assert (tmp_path / "full" / "x").exists()


def test_hf_export_of_moe_never_prompts_and_keeps_the_tokenizer(tmp_path):
    """convert.py --to hf of an MoE model at an open stdin: no "Do you wish to run the custom
    code?" prompt (it used to re-read the export directory's remote-code config); the exported
    tokenizer encodes like the project's GPT-2 BPE."""
    from transformers import AutoTokenizer

    from megatron_selfroute.data.tokenizer import build_tokenizer

    cfg = tiny_config("self", vocab=50257)
    cfg.data.tokenizer_type = "GPT2BPETokenizer"
    ckpt = save_model(random_model(cfg, seed=0), tmp_path / "c")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/checkpoint/convert.py"), "--input", str(ckpt),
         "--output", str(tmp_path / "hf"), "--to", "hf"], cwd=ROOT, stdin=subprocess.PIPE,
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr
    text = "Hello world, the self-routing MoE.\nSecond line"
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert hf_tok(text)["input_ids"] == build_tokenizer("GPT2BPETokenizer").tokenize(text)


def test_a_failure_inside_the_conversion_world_is_one_line_and_leaves_nothing(tmp_path):
    """The rank processes `--optimizer-state` starts report their first error as one line of
    the converter (here an optimizer file without Adam's step), and the output is removed."""
    model = make_model("self")
    save_model(model, tmp_path / "c")
    moments = {f"{n}::{k}": torch.zeros_like(p) for n, p in model.named_parameters()
               for k in ("master", "exp_avg", "exp_avg_sq")}
    save_file(moments, str(tmp_path / "c" / "optimizer.safetensors"),
              metadata={"iteration": "7"})
    code, _, err = run_main("checkpoint/convert.py", "--input", str(tmp_path / "c"), "--output",
                            str(tmp_path / "out"), "--to", "deepspeed", "--optimizer-state")
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # after its progress
    assert code == 1 and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert "import on 1 processes failed on rank 0: optimizer.safetensors: no Adam step" in \
        errors[0], err
    assert not (tmp_path / "out").exists()
