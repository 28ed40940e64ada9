"""Consolidated checkpoints and `load_model`, the one loader every tool uses.

A consolidated checkpoint is a directory with `model.safetensors` (the one-process `GPTModel`
state dict: every expert under its global id, the fixed-random router projections included, the
tied output layer stored once as `transformer.wte.weight`; training metadata in the safetensors
header) and `config.json` (`Config.to_dict()`). It holds no pickles and no parallel layout, so it is
the interchange format between DeepSpeed layouts, Hugging Face and the evaluation tools.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from megatron_selfroute.checkpoint import CheckpointFormatError
from megatron_selfroute.checkpoint.adapters import FAMILIES, family_of
from megatron_selfroute.config import Config
from megatron_selfroute.models.gpt import GPTModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class Checkpoint:
    """A model's weights (layout-free names), its config and training metadata."""

    state_dict: dict[str, Tensor]
    cfg: Config
    meta: dict = field(default_factory=dict)  # iteration, consumed_train_samples
    family: str = "gpt"  # adapters.FAMILIES
    shape: dict = field(default_factory=dict)  # a ViT's image shape_config


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: unreadable JSON ({e})") from None


def is_consolidated(path: str) -> bool:
    """A directory holding model.safetensors and a project config.json."""
    cfg_path = os.path.join(path, CONFIG)
    return (os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(cfg_path)
            and "model" in _read_json(cfg_path))


def canonical(ckpt: Checkpoint) -> dict[str, Tensor]:
    """The stored form: contiguous tensors, a tied output layer not duplicated."""
    sd = dict(ckpt.state_dict)
    if FAMILIES[ckpt.family].tied_output(ckpt.cfg):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_consolidated(ckpt: Checkpoint, out_dir: str) -> None:
    """Write `ckpt` as model.safetensors + config.json into `out_dir`."""
    from safetensors.torch import save_file

    cfg = Config.from_dict(ckpt.cfg.to_dict())
    cfg.parallel.expert_model_parallel_size = 1
    cfg.parallel.tensor_model_parallel_size = 1
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt", **{k: str(v) for k, v in ckpt.meta.items()}}
    save_file(canonical(ckpt), os.path.join(out_dir, WEIGHTS), metadata=meta)
    record = cfg.to_dict()
    if ckpt.family != "gpt":  # top-level keys Config.from_dict ignores
        record.update(model_family=ckpt.family, shape_config=ckpt.shape)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(record, f, indent=1)


def read_consolidated(path: str) -> Checkpoint:
    """Inverse of `save_consolidated`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = os.path.join(path, WEIGHTS)
    try:
        sd = load_file(weights)
        with safe_open(weights, "pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # a truncated or foreign file: one line naming it
        raise CheckpointFormatError(f"{weights}: not a safetensors file ({e})") from None
    record = _read_json(os.path.join(path, CONFIG))
    try:
        cfg = Config.from_dict(record)
        family = family_of(record)
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{path}/{CONFIG}: {e}") from None
    meta = {k: int(v) for k, v in header.items()
            if k in ("iteration", "consumed_train_samples")}
    return Checkpoint(sd, cfg, meta, family.name, dict(record.get("shape_config") or {}))


def load_checkpoint(path: str) -> Checkpoint:
    """Read a consolidated, DeepSpeed (save or tag directory) or Hugging Face checkpoint."""
    from megatron_selfroute.checkpoint import deepspeed_io, hf_export

    if not os.path.isdir(path):
        raise CheckpointFormatError(f"{path}: no such checkpoint directory")
    if is_consolidated(path):
        return read_consolidated(path)
    if deepspeed_io.is_deepspeed_checkpoint(path):
        sd, cfg, meta, family, shape = deepspeed_io.read_deepspeed(path)
        return Checkpoint(sd, cfg, meta, family, shape)
    if hf_export.is_hf_checkpoint(path):
        return hf_export.import_hf(path)
    raise CheckpointFormatError(f"{path}: not a consolidated, DeepSpeed or Hugging Face "
                                "checkpoint directory")


def eval_config(cfg: Config) -> Config:
    """A copy for inference: one process, dropless routing, the padding-free dispatcher."""
    cfg = Config.from_dict(cfg.to_dict())
    cfg.parallel.expert_model_parallel_size = 1
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.moe.moe_expert_capacity_factor = None
    cfg.moe.moe_token_dispatcher_type = "alltoall"
    cfg.model.recompute_activations = False
    cfg.model.recompute_granularity = None
    cfg.model.recompute_method = cfg.model.recompute_num_layers = None
    return cfg


def build_model(ckpt: Checkpoint, source: str, dropless: bool = True) -> nn.Module:
    """The checkpoint family's one-process model (a `GPTModel`, or a `VisionTransformer`)
    holding exactly the checkpoint's weights, in eval mode."""
    cfg = eval_config(ckpt.cfg) if dropless else ckpt.cfg
    family = FAMILIES[ckpt.family]
    model = family.build(cfg, ckpt.shape)
    want = model.state_dict()
    sd = dict(ckpt.state_dict)
    if family.tied_output(cfg) and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointFormatError(f"{source}: weights do not match its config (missing "
                                    f"{missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise CheckpointFormatError(f"{source}: {name} has shape {tuple(t.shape)}, the "
                                        f"config gives {tuple(want[name].shape)}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    return model.eval()


def load_model(path: str, device: str | torch.device = "cpu",
               dropless: bool = True) -> tuple[GPTModel, Config]:
    """Load any checkpoint `load_checkpoint` reads as an eval-mode `GPTModel` on `device`.

    `dropless` (default) removes the expert capacity so evaluation never drops tokens.
    """
    ckpt = load_checkpoint(path)
    if ckpt.family != "gpt":
        raise CheckpointFormatError(f"{path}: a {ckpt.family} checkpoint, not a language model")
    model = build_model(ckpt, path, dropless)
    return model.to(device), model.cfg
