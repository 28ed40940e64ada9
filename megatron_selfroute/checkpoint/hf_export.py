"""Hugging Face export and import.

Export: a dense model becomes a `GPT2LMHeadModel` directory (no custom code; bias-free layers are
written as zero biases, which computes the same function); an MoE model becomes a directory with
the remote-code `SelfRouteGPTForCausalLM` (`hf_modeling/`, copied next to the weights) that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads. Padded vocabulary rows
are sliced off; GPT-2 tokenizer files are added when the model was trained with one.

Import: a Hugging Face GPT-2 directory (e.g. the official `gpt2`: biases, tanh GELU) or an MoE
export of this project becomes a `Checkpoint` with the vocabulary padded again.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
from torch import Tensor

from megatron_selfroute.checkpoint import CheckpointFormatError
from megatron_selfroute.checkpoint.consolidated import Checkpoint, build_model
from megatron_selfroute.checkpoint.deepspeed_io import EXPERT_MARK
from megatron_selfroute.checkpoint.safe_load import safe_load
from megatron_selfroute.config import Config
from megatron_selfroute.models.hf_gpt2 import from_hf_state_dict, to_hf_state_dict
from megatron_selfroute.moe.router import ROUTERS

MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
REMOTE_FILES = ("configuration_selfroute_gpt.py", "modeling_selfroute_gpt.py")
HF_EXPERT_MARK = ".experts."
_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _eod(cfg: Config) -> Optional[int]:
    """End-of-text id of the model's tokenizer when it lies inside the vocabulary."""
    from megatron_selfroute.data.tokenizer import build_tokenizer

    d = cfg.data
    try:
        eod = build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model,
                              cfg.model.vocab_size).eod
    except (ValueError, OSError):
        return None
    return eod if eod < cfg.model.vocab_size else None


def write_tokenizer(cfg: Config, out_dir: str) -> Optional[str]:
    """Tokenizer files for `AutoTokenizer`; returns why none were written, else None."""
    from transformers import AutoTokenizer

    d = cfg.data
    if d.tokenizer_type == "HuggingFaceTokenizer" and d.tokenizer_model:
        AutoTokenizer.from_pretrained(d.tokenizer_model, local_files_only=True
                                      ).save_pretrained(out_dir)
        return None
    if d.tokenizer_type != "GPT2BPETokenizer" or d.tokenizer_model:
        return f"no tokenizer files written (tokenizer {d.tokenizer_type} is not exportable)"
    import tempfile

    from megatron_selfroute.data.tokenizer import GPT2_MERGE_FILE, GPT2_VOCAB_FILE

    special = "<|endoftext|>"
    # The tokenizer is built in a directory of its own and saved into out_dir: reading out_dir
    # back would meet its remote-code config.json and make transformers ask "Do you wish to run
    # the custom code? [y/N]" (a converter must never prompt).
    with tempfile.TemporaryDirectory() as tmp:
        for src, name in ((d.vocab_file or GPT2_VOCAB_FILE, "vocab.json"),
                          (d.merge_file or GPT2_MERGE_FILE, "merges.txt")):
            shutil.copyfile(src, os.path.join(tmp, name))
            shutil.copyfile(src, os.path.join(out_dir, name))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer",
                       "model_max_length": cfg.model.positions, "bos_token": special,
                       "eos_token": special, "unk_token": special, "add_prefix_space": False},
                      f, indent=1)
        AutoTokenizer.from_pretrained(tmp).save_pretrained(out_dir)  # adds tokenizer.json
    return None


def _gpt2_config(cfg: Config):
    from transformers import GPT2Config

    m = cfg.model
    eod = _eod(cfg)
    return GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.positions, n_embd=m.hidden_size,
        n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=m.ffn_size,
        activation_function="gelu_pytorch_tanh" if m.gelu_approximation == "tanh" else "gelu",
        resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
        attn_pdrop=m.attention_dropout, layer_norm_epsilon=m.layernorm_epsilon,
        initializer_range=m.init_method_std,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        bos_token_id=eod, eos_token_id=eod)


def _moe_config(cfg: Config, starts: list[int], router_kind: str):
    from megatron_selfroute.checkpoint.hf_modeling.configuration_selfroute_gpt import (
        SelfRouteGPTConfig,
    )

    m, moe = cfg.model, cfg.moe
    eod = _eod(cfg)
    return SelfRouteGPTConfig(
        vocab_size=m.vocab_size, n_positions=m.positions, hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size, moe_ffn_hidden_size=moe.moe_ffn_hidden_size or m.ffn_size,
        num_experts=moe.num_experts, moe_router_topk=moe.moe_router_topk,
        moe_layers=moe.layer_pattern(m.num_layers), router_type=router_kind,
        self_route_starts=starts, moe_router_pre_softmax=moe.moe_router_pre_softmax,
        bias_linear=not m.disable_bias_linear, bias_layernorm=not m.disable_bias_layernorm,
        layer_norm_epsilon=m.layernorm_epsilon, gelu_approximation=m.gelu_approximation,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        megatron_selfroute_config=cfg.to_dict(), bos_token_id=eod, eos_token_id=eod,
        moe_router_score_function=moe.moe_router_score_function,
        moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
        shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        hash_table_size=m.padded_vocab_size if router_kind == "hash" else 0,
        architectures=["SelfRouteGPTForCausalLM"],
        auto_map={"AutoConfig": "configuration_selfroute_gpt.SelfRouteGPTConfig",
                  "AutoModelForCausalLM": "modeling_selfroute_gpt.SelfRouteGPTForCausalLM"})


def export_hf(ckpt: Checkpoint, out_dir: str, source: str) -> list[str]:
    """Write a Hugging Face directory; returns notes for the user (e.g. no tokenizer)."""
    cfg = ckpt.cfg
    router_cls = ROUTERS.get(cfg.moe.router_type) if cfg.moe.is_moe else None
    if cfg.moe.is_moe and (router_cls is None or router_cls.hf_kind is None):
        why = router_cls.hf_refusal if router_cls else "is not registered in this process"
        raise CheckpointFormatError(f"{source}: router type {cfg.moe.router_type!r} {why}")
    model = build_model(ckpt, source)
    vocab = cfg.model.vocab_size
    sd = model.state_dict()
    if cfg.moe.is_moe:
        from megatron_selfroute.checkpoint.hf_modeling.modeling_selfroute_gpt import (
            SelfRouteGPTForCausalLM,
        )

        states = [layer.router.hf_export_state() for layer in model.moe_layers]
        starts = [st["self_route_start"] for st in states if "self_route_start" in st]
        hf = SelfRouteGPTForCausalLM(_moe_config(cfg, starts, router_cls.hf_kind))
        hf_sd = {k.replace(EXPERT_MARK, HF_EXPERT_MARK): v for k, v in sd.items()}
        for name in ("transformer.wte.weight", "lm_head.weight"):
            hf_sd[name] = hf_sd[name][:vocab]
    else:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel(_gpt2_config(cfg))
        hf_sd = to_hf_state_dict(sd, vocab)
        for name, t in hf.state_dict().items():  # bias-free layers: zero biases, same function
            if name not in hf_sd and name.endswith(".bias"):
                hf_sd[name] = torch.zeros_like(t)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointFormatError(f"{source}: Hugging Face model mismatch (missing "
                                    f"{sorted(set(missing) - tied)[:3]}, unexpected "
                                    f"{sorted(unexpected)[:3]})")
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    if cfg.moe.is_moe:
        for name in REMOTE_FILES:
            shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(out_dir, name))
    note = write_tokenizer(cfg, out_dir)
    return [note] if note else []


def is_hf_checkpoint(path: str) -> bool:
    """A directory whose config.json names a Hugging Face model_type."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    try:
        with open(cfg_path) as f:
            return "model_type" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False


def _read_hf_weights(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single, index = os.path.join(path, "model.safetensors"), os.path.join(
        path, "model.safetensors.index.json")
    try:
        if os.path.isfile(single):
            return load_file(single)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for name in files:
                sd.update(load_file(os.path.join(path, name)))
            return sd
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: unreadable Hugging Face weights ({e})") from None
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return safe_load(bin_path)
    raise CheckpointFormatError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin")


def _config_from_gpt2(conf: dict, path: str) -> Config:
    act = conf.get("activation_function", "gelu_new")
    if act not in _TANH + ("gelu",):
        raise CheckpointFormatError(f"{path}: activation_function {act!r} is not supported")
    if conf.get("scale_attn_by_inverse_layer_idx") or not conf.get("scale_attn_weights", True):
        raise CheckpointFormatError(f"{path}: non-standard attention scaling is not supported")
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size = conf["n_layer"], conf["n_embd"]
    m.num_attention_heads, m.ffn_hidden_size = conf["n_head"], conf.get("n_inner")
    m.seq_length = m.max_position_embeddings = conf.get("n_positions", conf.get("n_ctx", 1024))
    m.vocab_size = conf["vocab_size"]
    m.hidden_dropout = conf.get("resid_pdrop", 0.1)
    m.attention_dropout = conf.get("attn_pdrop", 0.1)
    m.layernorm_epsilon = conf.get("layer_norm_epsilon", 1e-5)
    m.init_method_std = conf.get("initializer_range", 0.02)
    m.gelu_approximation = "tanh" if act in _TANH else "none"
    m.untie_embeddings_and_output_weights = not conf.get("tie_word_embeddings", True)
    return cfg


def import_hf(path: str) -> Checkpoint:
    """A Hugging Face GPT-2 (or this project's MoE export) directory as a `Checkpoint`."""
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    kind = conf.get("model_type")
    hf_sd = _read_hf_weights(path)
    if kind == "gpt2":
        cfg = _config_from_gpt2(conf, path)
        # The base GPT2Model (e.g. the official `gpt2` files) has no `transformer.` prefix.
        hf_sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                 for k, v in hf_sd.items()}
        sd = from_hf_state_dict(hf_sd, cfg.model.padded_vocab_size)
    elif kind == "selfroute_gpt":
        cfg = Config.from_dict(conf["megatron_selfroute_config"])
        sd = {k.replace(HF_EXPERT_MARK, EXPERT_MARK): v for k, v in hf_sd.items()}
        pad = cfg.model.padded_vocab_size
        for name in ("transformer.wte.weight", "lm_head.weight"):
            if name in sd:
                t = sd[name]
                sd[name] = torch.cat([t, t.new_zeros(pad - t.shape[0], t.shape[1])])
    else:
        raise CheckpointFormatError(f"{path}: model_type {kind!r} is not supported (gpt2 or "
                                    "selfroute_gpt)")
    if not cfg.model.untie_embeddings_and_output_weights:
        sd.pop("lm_head.weight", None)
    return Checkpoint(sd, cfg, {})
