"""Hugging Face config of a megatron_selfroute GPT-2 MoE model (remote code, self-contained).

Copied next to the weights by `tools/checkpoint/convert.py --to hf`; imports only transformers.
"""
from transformers import PretrainedConfig


class SelfRouteGPTConfig(PretrainedConfig):
    """GPT-2 backbone with top-k MoE MLPs in the blocks flagged by `moe_layers`.

    Routers (`router_type`): `self` reads the expert logits from coordinates
    [`self_route_starts[i]`, + `num_experts`) of the MoE layer's (post-LayerNorm) input; `learned`
    multiplies by a learned [experts, hidden] matrix; `fixed-random` by a frozen one. Routing is
    dropless (no expert capacity) and the k selected logits are softmaxed (or, with
    `moe_router_pre_softmax`, all logits before top-k; with `moe_router_score_function`
    "sigmoid", the k largest sigmoid scores are normalised over the k). `hash` looks each token
    id up in a [`hash_table_size`, k] table, weights 1/k. With `moe_router_enable_expert_bias`
    a per-expert `load_bias` buffer is added for selection only. `shared_expert_intermediate_size`
    adds a dense MLP every token of an MoE block passes through.
    """

    model_type = "selfroute_gpt"
    attribute_map = {"max_position_embeddings": "n_positions", "n_embd": "hidden_size",
                     "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}

    def __init__(self, vocab_size: int = 50257, n_positions: int = 1024, hidden_size: int = 768,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12,
                 ffn_hidden_size: int = 3072, moe_ffn_hidden_size: int = 3072,
                 num_experts: int = 8, moe_router_topk: int = 2, moe_layers: list | None = None,
                 router_type: str = "self", self_route_starts: list | None = None,
                 moe_router_pre_softmax: bool = False, bias_linear: bool = True,
                 bias_layernorm: bool = True, layer_norm_epsilon: float = 1e-5,
                 gelu_approximation: str = "tanh", tie_word_embeddings: bool = True,
                 megatron_selfroute_config: dict | None = None,
                 moe_router_score_function: str = "softmax",
                 moe_router_enable_expert_bias: bool = False,
                 shared_expert_intermediate_size: int | None = None,
                 hash_table_size: int = 0, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.moe_ffn_hidden_size = moe_ffn_hidden_size
        self.num_experts = num_experts
        self.moe_router_topk = moe_router_topk
        self.moe_layers = list(moe_layers) if moe_layers is not None else [1] * num_hidden_layers
        self.router_type = router_type
        self.self_route_starts = list(self_route_starts or [])
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.bias_linear = bias_linear
        self.bias_layernorm = bias_layernorm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.gelu_approximation = gelu_approximation
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.hash_table_size = hash_table_size
        # The training configuration, kept so the export converts back without loss.
        self.megatron_selfroute_config = megatron_selfroute_config
        kwargs.setdefault("use_cache", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
