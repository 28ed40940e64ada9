"""Checkpoint formats and conversions.

- DeepSpeed training checkpoints (`training/checkpointing.py`): per-layout, pickled (loaded only
  with `torch.load(weights_only=True)` and an allow-list).
- Consolidated checkpoints: `model.safetensors` (every expert under its global id, layout-free) +
  `config.json` (the `Config` dict). No pickles; the interchange format of every tool.
- Hugging Face directories: GPT-2 (`GPT2LMHeadModel`) for dense models, a remote-code model for MoE.
"""


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be read or written as asked (one-line reason naming the file)."""
