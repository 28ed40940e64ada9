"""megatron_selfroute: Megatron-style MoE training on DeepSpeed with parameter-free self-routing."""

__version__ = "0.1.0"
