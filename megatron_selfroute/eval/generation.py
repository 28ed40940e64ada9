"""Batched autoregressive sampling from a `GPTModel` (greedy, temperature, top-k, top-p).

Prompts of different lengths are left-padded; padding is masked out of attention and positions
count only real tokens, so each prompt continues exactly as it would alone (routing is per token
and dropless at evaluation). Every step recomputes the whole window (no key/value cache): simple
and exact. Sampling draws from the given `torch.Generator`, so a seed fixes the output.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_selfroute.models.gpt import GPTModel


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf ([B, V], fp32)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, -1) >= top_p  # keeps at least one
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _inputs(seqs: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ids [B, S], positions [B, S] and a bool attention mask [B, 1, S, S]."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    keep = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        keep[i, width - len(s):] = True
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal & keep[:, None, None, :]) | torch.eye(width, dtype=torch.bool)
    return ids.to(device), positions.to(device), mask.to(device)


@torch.no_grad()
def generate(model: GPTModel, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
             stop: Optional[Callable[[list[int]], bool]] = None) -> list[list[int]]:
    """New tokens for each prompt (temperature 0 = greedy). A sequence ends at `eos_id`
    (not included) or once `stop(new_tokens)` is true; the window keeps the last positions."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    window = model.cfg.model.positions
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        ids, positions, mask = _inputs([seqs[i][-window:] for i in active], device)
        logits = model(ids, position_ids=positions, attention_mask=mask).logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1)
        else:
            nxt = logits.argmax(-1).cpu()
        for i, tok in zip(active, nxt.tolist(), strict=True):
            if eos_id is not None and tok == eos_id:
                done[i] = True
                continue
            seqs[i].append(tok)
            new[i].append(tok)
            if stop is not None and stop(new[i]):
                done[i] = True
    return new
