"""Weight mapping between this project's GPT and Hugging Face `GPT2LMHeadModel`.

Names are identical; Hugging Face's `Conv1D` stores [in, out] where `nn.Linear` stores [out, in],
so those four weights per block are transposed. The vocabulary is padded here and not there:
padded rows are zero on import and sliced off on export.
"""
from __future__ import annotations

import torch
from torch import Tensor

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


def from_hf_state_dict(hf_sd: dict[str, Tensor], padded_vocab: int) -> dict[str, Tensor]:
    """Hugging Face GPT-2 state dict -> this project's dense GPT state dict."""
    out = {}
    for name, t in hf_sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        if name in ("transformer.wte.weight", "lm_head.weight") and t.shape[0] < padded_vocab:
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])])
        out[name] = t.contiguous()
    return out


def to_hf_state_dict(sd: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """This project's dense GPT state dict -> Hugging Face GPT-2 (padding rows sliced off)."""
    out = {}
    for name, t in sd.items():
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:vocab_size]
        out[name] = t.contiguous()
    return out

