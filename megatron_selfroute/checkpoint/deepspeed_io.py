"""Read and write this project's DeepSpeed training checkpoints.

A tag directory written by `training/checkpointing.py` (any data/expert-parallel layout, ZeRO 0-2)
holds the full non-expert state in `mp_rank_00_model_states.pt` (key `module`; ZeRO 1/2 keep whole
parameters on every rank, only optimizer states are partitioned) and one file per (MoE layer,
global expert), `layer_{l}_expert_{e}_mp_rank_00_model_states.pt`, whose keys already use global
expert ids. Reading merges them into one layout-free state dict (the one-process model's names);
writing does the reverse for any expert-parallel size, since DeepSpeed's expert files do not
depend on it: only `run_state.json` (config, world size) and `dp_world_size` change.

Every pickle is opened by `safe_load.py` (`torch.load(weights_only=True)` and an allow-list);
anything else is refused without being executed.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from megatron_selfroute.checkpoint import CheckpointFormatError, rng
from megatron_selfroute.checkpoint.adapters import EXPERT_MARK, FAMILIES, family_of
from megatron_selfroute.checkpoint.files import (
    MODEL_STATES,
    RUN_STATE,
    expert_file,
    is_save_or_tag_dir,
    resolve_tag_dir,
    rng_file,
    tag_for,
    write_pointer,
)
from megatron_selfroute.checkpoint.safe_load import safe_load
from megatron_selfroute.config import Config
from megatron_selfroute.seeding import mix_seed

is_deepspeed_checkpoint = is_save_or_tag_dir


def _run_state(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, RUN_STATE)
    try:
        with open(path) as f:
            state = json.load(f)
        Config.from_dict(state["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a run state of this project ({e})") from None
    return state


def moe_blocks(cfg: Config) -> list[int]:
    """Block index of each MoE layer, in DeepSpeed's MoE-layer order."""
    return [i for i, v in enumerate(cfg.moe.layer_pattern(cfg.model.num_layers)) if v]


def read_deepspeed(path: str) -> tuple[dict[str, torch.Tensor], Config, dict, str, dict]:
    """(state dict with global expert ids, config, {iteration, consumed_train_samples}, model
    family, its shape_config)."""
    tag_dir = resolve_tag_dir(path)
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt")
           for n in os.listdir(tag_dir)):
        raise CheckpointFormatError(f"{tag_dir}: ZeRO-3 checkpoints are not supported")
    if os.path.isfile(os.path.join(tag_dir, "mp_rank_01_model_states.pt")):
        raise CheckpointFormatError(f"{tag_dir}: tensor/pipeline-parallel checkpoints are not "
                                    "supported")
    state = _run_state(tag_dir)
    cfg = Config.from_dict(state["config"])
    main = safe_load(os.path.join(tag_dir, MODEL_STATES))
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise CheckpointFormatError(f"{tag_dir}/{MODEL_STATES}: no 'module' state dict")
    family = family_of(state)
    sd = {k: v for k, v in main["module"].items() if EXPERT_MARK not in k}
    for moe_idx, block in enumerate(moe_blocks(cfg)):
        for expert in range(cfg.moe.num_experts):
            name = expert_file(moe_idx, expert)
            part = safe_load(os.path.join(tag_dir, name))
            prefix = family.expert_prefix(block, expert)
            if not isinstance(part, dict) or not part or any(
                    not k.startswith(prefix) for k in part):
                raise CheckpointFormatError(f"{tag_dir}/{name}: expected only {prefix}* tensors")
            sd.update(part)
    if family.tied_output(cfg):
        sd.pop("lm_head.weight", None)
    meta = {"iteration": int(state.get("iteration", 0)),
            "consumed_train_samples": int(state.get("consumed_train_samples", 0))}
    return ({k: v.detach().contiguous() for k, v in sd.items()}, cfg, meta, family.name,
            dict(state.get("shape_config") or {}))


def write_deepspeed(model: nn.Module, cfg: Config, out_dir: str, ep_size: int,
                    world_size: int, meta: dict, family: str = "gpt",
                    shape_config: Optional[dict] = None) -> str:
    """Write `model` (one process, every expert) as a checkpoint for expert-parallel size
    `ep_size`.

    Model weights only: the file set `engine.load_checkpoint(load_module_only=True)` reads
    (`pretrain_gpt.py`/`pretrain_vit.py --load DIR --no-load-optim` or `--finetune`; `family`
    and `shape_config` are what the ViT trainer checks on resume). Optimizer states are not
    written (ZeRO partitions depend on the layout and cannot be re-sharded here); RNG files are
    fresh seeded states for `world_size` ranks. Returns the tag directory.
    """
    num_experts = cfg.moe.num_experts or 0
    if ep_size < 1 or (num_experts and num_experts % ep_size) or (not num_experts and ep_size > 1):
        raise CheckpointFormatError(f"--expert-model-parallel-size {ep_size} does not divide "
                                    f"the {num_experts} experts")
    if world_size % ep_size:
        raise CheckpointFormatError(f"--world-size {world_size} is not a multiple of "
                                    f"--expert-model-parallel-size {ep_size}")
    cfg = Config.from_dict(cfg.to_dict())
    cfg.parallel.expert_model_parallel_size = ep_size
    iteration = int(meta.get("iteration", 0))
    tag = tag_for(iteration)
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir)
    full = model.state_dict()
    module = {k: v for k, v in full.items() if EXPERT_MARK not in k}
    buffers = [n for n, _ in model.named_buffers() if n in module]
    torch.save({
        "module": module, "buffer_names": buffers, "optimizer": None, "param_shapes": None,
        "frozen_param_shapes": None, "shared_params": None, "frozen_param_fragments": None,
        "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": int(meta.get("consumed_train_samples", 0)),
        "dp_world_size": world_size, "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": None, "ds_version": _deepspeed_version(),
        "num_experts": [num_experts] * len(moe_blocks(cfg)), "ds_autoep_layers": None,
    }, os.path.join(tag_dir, MODEL_STATES))
    for moe_idx, block in enumerate(moe_blocks(cfg)):
        for expert in range(num_experts):
            prefix = FAMILIES[family].expert_prefix(block, expert)
            part = {k: v for k, v in full.items() if k.startswith(prefix)}
            torch.save(part, os.path.join(tag_dir, expert_file(moe_idx, expert)))
    for rank in range(world_size):
        torch.save(rng.seeded(mix_seed(cfg.train.seed, iteration, rank)),
                   os.path.join(tag_dir, rng_file(rank)))
    with open(os.path.join(tag_dir, RUN_STATE), "w") as f:
        json.dump({"iteration": iteration,
                   "consumed_train_samples": int(meta.get("consumed_train_samples", 0)),
                   "world_size": world_size, "model_family": family,
                   "shape_config": shape_config or {}, "config": cfg.to_dict()}, f, indent=1)
    write_pointer(out_dir, tag)
    return tag_dir


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
