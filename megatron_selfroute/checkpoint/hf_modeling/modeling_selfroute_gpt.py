"""Hugging Face model of a megatron_selfroute GPT-2 MoE checkpoint (remote code, self-contained).

Copied next to the weights by `tools/checkpoint/convert.py --to hf` and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It imports only torch and
transformers and re-implements the inference path of the training model: pre-LayerNorm GPT-2
blocks whose MLP is dense or a dropless top-k mixture of GPT-2 MLP experts (plus an optional
shared expert `shared_mlp` every token passes through). Weights use
`nn.Linear` layout ([out, in]) and the names of the training model, experts as
`transformer.h.{i}.mlp.experts.{e}`.

Generation recomputes the whole prefix at each step (no key/value cache): simple, and independent
of the cache API of the installed transformers version.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_selfroute_gpt import SelfRouteGPTConfig


def _layer_norm(config: SelfRouteGPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon,
                        bias=config.bias_layernorm)


class MLP(nn.Module):
    """c_fc -> GELU -> c_proj (a dense block's MLP, or one expert)."""

    def __init__(self, config: SelfRouteGPTConfig, ffn: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, ffn, bias=config.bias_linear)
        self.c_proj = nn.Linear(ffn, config.hidden_size, bias=config.bias_linear)
        self.approximate = config.gelu_approximation

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Router(nn.Module):
    """fp32 expert logits [T, E] from the MoE layer input x [T, D] (hash: a token-id table)."""

    def __init__(self, config: SelfRouteGPTConfig, moe_index: int) -> None:
        super().__init__()
        self.kind = config.router_type
        e, d = config.num_experts, config.hidden_size
        if self.kind == "self":
            start = config.self_route_starts[moe_index]
            self.dims = slice(start, start + e)
        elif self.kind == "learned":
            self.weight = nn.Parameter(torch.zeros(e, d))
        elif self.kind == "fixed-random":
            self.register_buffer("proj", torch.zeros(e, d), persistent=True)
        elif self.kind == "hash":
            self.register_buffer("table", torch.zeros(config.hash_table_size,
                                                      config.moe_router_topk, dtype=torch.long),
                                 persistent=True)
        else:
            raise ValueError(f"router type {self.kind!r} is not supported by this model")
        if config.moe_router_enable_expert_bias:  # selection only, fp32
            self.register_buffer("load_bias", torch.zeros(e), persistent=True)
        else:
            self.load_bias = None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "self":
            return x[:, self.dims].float()
        w = self.weight if self.kind == "learned" else self.proj
        return F.linear(x.float(), w.float())


class MoE(nn.Module):
    """Dropless top-k mixture: y = sum over the k selected experts of prob * expert(x)."""

    def __init__(self, config: SelfRouteGPTConfig, moe_index: int) -> None:
        super().__init__()
        self.topk = config.moe_router_topk
        self.pre_softmax = config.moe_router_pre_softmax
        self.sigmoid = config.moe_router_score_function == "sigmoid"
        self.router = Router(config, moe_index)
        self.experts = nn.ModuleList(MLP(config, config.moe_ffn_hidden_size)
                                     for _ in range(config.num_experts))

    def select(self, x: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, expert ids) [T, k]; the bias moves the selection, never the weights."""
        k = self.topk
        if self.router.kind == "hash":
            ids = self.router.table[input_ids.reshape(-1)]
            return torch.full(ids.shape, 1.0 / k, device=x.device), ids
        logits = self.router(x)
        bias = self.router.load_bias
        if self.sigmoid:
            scores = torch.sigmoid(logits)
            ids = torch.topk(scores if bias is None else scores + bias, k, dim=-1)[1]
            picked = scores.gather(1, ids)
            return picked / (picked.sum(-1, keepdim=True) + 1e-20), ids
        if self.pre_softmax:
            scores = torch.softmax(logits, -1)
            ids = torch.topk(scores if bias is None else scores + bias, k, dim=-1)[1]
            return scores.gather(1, ids), ids
        ids = torch.topk(logits if bias is None else logits + bias, k, dim=-1)[1]
        return torch.softmax(logits.gather(1, ids), -1), ids

    def forward(self, x_BSD: Tensor, input_ids: Tensor) -> Tensor:
        x = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs, ids = self.select(x, input_ids)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel():
                y = expert(x.index_select(0, token)).float() * probs[token, slot].unsqueeze(1)
                out.index_add_(0, token, y)
        return out.to(x.dtype).view(x_BSD.shape)


class Attention(nn.Module):
    """Multi-head causal self-attention (fused QKV projection)."""

    def __init__(self, config: SelfRouteGPTConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        d = config.hidden_size
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias_linear)
        self.c_proj = nn.Linear(d, d, bias=config.bias_linear)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.c_attn(x).split(d, dim=2))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, config: SelfRouteGPTConfig, is_moe: bool, moe_index: int) -> None:
        super().__init__()
        self.ln_1 = _layer_norm(config)
        self.attn = Attention(config)
        self.ln_2 = _layer_norm(config)
        self.is_moe = is_moe
        self.mlp = MoE(config, moe_index) if is_moe else MLP(config, config.ffn_hidden_size)
        shared = config.shared_expert_intermediate_size
        self.shared_mlp = MLP(config, shared) if is_moe and shared else None

    def forward(self, x: Tensor, mask: Optional[Tensor], input_ids: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        h = self.ln_2(x)
        if not self.is_moe:
            return x + self.mlp(h)
        y = self.mlp(h, input_ids)
        if self.shared_mlp is not None:
            y = y + self.shared_mlp(h)
        return x + y


class SelfRouteGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """GPT-2 MoE language model; logits over the tokenizer's vocabulary."""

    config_class = SelfRouteGPTConfig
    base_model_prefix = "transformer"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: SelfRouteGPTConfig) -> None:
        super().__init__(config)
        blocks, moe_index = [], 0
        for flag in config.moe_layers:
            blocks.append(Block(config, bool(flag), moe_index))
            moe_index += int(bool(flag))
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),
            wpe=nn.Embedding(config.n_positions, config.hidden_size),
            h=nn.ModuleList(blocks),
            ln_f=_layer_norm(config),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                **kwargs) -> CausalLMOutput:
        """attention_mask [B, S] (1 = token, 0 = padding, left or right); positions count only
        real tokens. labels [B, S] are shifted inside (-100 = ignored)."""
        b, s = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            if position_ids is None:
                position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(s, dtype=torch.bool, device=input_ids.device)
            mask = ((causal & keep[:, None, None, :]) | eye)  # padding rows see themselves
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        for block in self.transformer.h:
            x = block(x, mask, input_ids)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor,
                                      attention_mask: Optional[Tensor] = None,
                                      **kwargs) -> dict:
        """The whole sequence every step (no key/value cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
