"""Checkpoint formats and conversions, and the toolkit they share.

- DeepSpeed training checkpoints (`training/checkpointing.py`): per-layout, pickled (loaded only
  with `torch.load(weights_only=True)` and an allow-list: `safe_load.py`).
- Consolidated checkpoints: `model.safetensors` (every expert under its global id, layout-free) +
  `config.json` (the `Config` dict). No pickles; the interchange format of every tool.
- Hugging Face directories: GPT-2 (`GPT2LMHeadModel`) for dense models, a remote-code model for MoE.

The toolkit: one error family (below), the directory layout and its pointer file (`files.py`),
the RNG-state codec (`rng.py`), the safe loader (`safe_load.py`) and a state-dict adapter per model
family (`adapters.py`).
"""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (one-line reason naming the file or the flag)."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint that cannot be read or written as asked (unreadable, foreign, mismatched)."""


class CheckpointLoadError(CheckpointFormatError):
    """A file the safe loader refused: missing, corrupt, or holding objects outside the
    allow-list (never executed)."""
