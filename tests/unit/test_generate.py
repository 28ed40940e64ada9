"""tools/generate.py: deterministic for a seed; greedy decoding equals transformers' generate on
the exported model (dense GPT2LMHeadModel and the MoE remote code); top-k/top-p filters equal a
hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_selfroute.checkpoint.consolidated import load_checkpoint
from megatron_selfroute.checkpoint.hf_export import export_hf
from megatron_selfroute.data.tokenizer import build_tokenizer
from megatron_selfroute.eval.generation import filter_logits
from tests.integration.helpers import random_model, run_main, save_model, tiny_config

PROMPT = "To be, or not to be, that is"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for kind, router in (("moe", "learned"), ("dense", None), ("hash", "hash")):
        cfg = tiny_config(router, vocab=50257, seq=32, tokenizer="GPT2BPETokenizer")
        out[kind] = str(save_model(random_model(cfg, seed=2, scale=0.3), root / kind))
    return out


def generate(*args: str) -> str:
    code, out, err = run_main("generate.py", *args)
    assert code == 0, err
    return out


def test_sampling_is_deterministic_for_a_seed(checkpoints):
    args = ["--load", checkpoints["moe"], "--prompt", PROMPT, "--max-new-tokens", "12",
            "--temperature", "1.0", "--top-p", "0.95"]
    first = generate(*args, "--seed", "7")
    torch.manual_seed(999)  # the global RNG must not matter
    assert generate(*args, "--seed", "7") == first
    assert generate(*args, "--seed", "8") != first
    assert first.startswith(PROMPT) and len(first) > len(PROMPT)


@pytest.mark.parametrize("kind", ["moe", "dense", "hash"])
def test_greedy_equals_transformers_generate(checkpoints, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    export_hf(load_checkpoint(checkpoints[kind]), str(tmp_path / "hf"), checkpoints[kind])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                              trust_remote_code=kind != "dense").eval()
    tok = build_tokenizer("GPT2BPETokenizer")
    ids = torch.tensor([tok.tokenize(PROMPT)])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                          do_sample=False, eos_token_id=tok.eod, pad_token_id=tok.eod)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eod]
    want = tok.detokenize(ids[0].tolist() + new)
    greedy = generate("--load", checkpoints[kind], "--prompt", PROMPT, "--max-new-tokens", "10",
                      "--temperature", "0")
    assert greedy.rstrip("\n") == want
    # top-k 1 sampling is greedy too
    assert generate("--load", checkpoints[kind], "--prompt", PROMPT, "--max-new-tokens", "10",
                    "--temperature", "1", "--top-k", "1") == greedy


def test_filters_equal_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    inf = -math.inf
    assert filter_logits(logits, top_k=2).tolist() == [[inf, inf, 3.0, 4.0]]
    # softmax = [0.032, 0.087, 0.237, 0.644]: 0.5 keeps the top one, 0.7 the top two,
    # 0.9 the top three
    assert filter_logits(logits, top_p=0.5).tolist() == [[inf, inf, inf, 4.0]]
    assert filter_logits(logits, top_p=0.7).tolist() == [[inf, inf, 3.0, 4.0]]
    assert filter_logits(logits, top_p=0.9).tolist() == [[inf, 2.0, 3.0, 4.0]]


def test_bad_flags_are_one_line(checkpoints):
    code, _, err = run_main("generate.py", "--load", checkpoints["moe"], "--prompt", "x",
                            "--top-p", "0")
    assert code == 1 and "--top-p" in err and err.strip().count("\n") == 0
