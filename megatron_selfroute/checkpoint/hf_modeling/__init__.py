"""Remote-code Hugging Face model files, copied verbatim next to exported MoE weights."""
