"""Read and write this project's DeepSpeed training checkpoints.

A tag directory written by `training/checkpointing.py` (any data/expert-parallel layout, ZeRO 0-2)
holds the full non-expert state in `mp_rank_00_model_states.pt` (key `module`; ZeRO 1/2 keep whole
parameters on every rank, only optimizer states are partitioned) and one file per (MoE layer,
global expert), `layer_{l}_expert_{e}_mp_rank_00_model_states.pt`, whose keys already use global
expert ids. Reading merges them into one layout-free state dict (the one-process model's names);
writing does the reverse for any expert-parallel size, since DeepSpeed's expert files do not
depend on it: DeepSpeed itself writes them through a one-process engine, and only
`run_state.json` (config, world size, family) names the target layout.

The input's manifest (`manifest.py`) is verified before anything is read; the output gets one.
Every pickle is opened by `safe_load.py` (`torch.load(weights_only=True)` and an allow-list);
anything else is refused without being executed.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from megatron_selfroute.checkpoint import CheckpointFormatError, manifest, rng
from megatron_selfroute.checkpoint.adapters import EXPERT_MARK, family_of
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


def run_state(tag_dir: str) -> dict:
    """The checkpoint's run_state.json (iteration, world size, layout, config), checked."""
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


def merge_tensor_parallel(parts: list[dict], cfg: Config, family, state: dict,
                          source: str) -> dict:
    """The one-device state dict from T tensor-parallel ranks' model states: each sharded
    tensor is put back where its rank's `tp_shard` (the function the trainer initialised and
    trained it with) took it from; replicated tensors come from rank 0."""
    from types import SimpleNamespace

    from megatron_selfroute.models.vit import ema_buffer_name
    from megatron_selfroute.parallel.tensor_parallel import (
        apply_tensor_parallel,
        is_tp_sharded,
        place_shard,
        shard_positions,
    )

    tp = len(parts)
    full_sd = dict(parts[0])
    shape = dict(state.get("shape_config") or {})
    for rank in range(tp):
        template = family.build(cfg, shape)
        apply_tensor_parallel(template, SimpleNamespace(tp=tp, tp_rank=rank, tp_group=None))
        for name, p in template.named_parameters():
            if not is_tp_sharded(p) or name not in parts[rank]:
                continue
            if rank == 0:
                full_sd[name] = torch.empty(p.tp_full_shape, dtype=parts[0][name].dtype)
            where = shard_positions(p)
            piece = parts[rank][name]
            if tuple(piece.shape) != tuple(where.shape):
                raise CheckpointFormatError(f"{source}: {name} of tensor-parallel rank {rank} has "
                                            f"shape {tuple(piece.shape)}, its layout gives "
                                            f"{tuple(where.shape)}")
            place_shard(full_sd[name], where, piece)
            ema = ema_buffer_name(name)  # a ViT's EMA buffer of this shard: the same positions
            if ema in parts[rank]:
                if rank == 0:
                    full_sd[ema] = torch.empty(p.tp_full_shape, dtype=parts[0][ema].dtype)
                place_shard(full_sd[ema], where, parts[rank][ema])
        del template
    return full_sd


def read_deepspeed(path: str) -> tuple[dict[str, torch.Tensor], Config, dict, str, dict]:
    """(state dict with global expert ids, config, {iteration, consumed_train_samples}, model
    family, its shape_config)."""
    tag_dir = resolve_tag_dir(path)
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt")
           for n in os.listdir(tag_dir)):
        raise CheckpointFormatError(f"{tag_dir}: ZeRO-3 checkpoints are not supported")
    state = run_state(tag_dir)
    tp = int((state.get("layout") or {}).get("tp", 1))
    if tp == 1 and os.path.isfile(os.path.join(tag_dir, "mp_rank_01_model_states.pt")):
        raise CheckpointFormatError(f"{tag_dir}: model-parallel files without a tensor-parallel "
                                    "layout in its run state (pipeline parallelism?): not "
                                    "supported")
    manifest.verify(tag_dir)  # sizes and checksums before anything is unpickled
    cfg = Config.from_dict(state["config"])
    family = family_of(state)
    parts = []
    for r in range(tp):  # one model-states file per tensor-parallel rank
        name = MODEL_STATES.replace("mp_rank_00", f"mp_rank_{r:02d}")
        main = safe_load(os.path.join(tag_dir, name))
        if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
            raise CheckpointFormatError(f"{tag_dir}/{name}: no 'module' state dict")
        parts.append({k: v for k, v in main["module"].items() if EXPERT_MARK not in k})
    sd = parts[0] if tp == 1 else merge_tensor_parallel(parts, cfg, family, state, tag_dir)
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
    cfg.parallel.tensor_model_parallel_size = 1  # written for TP 1
    iteration = int(meta.get("iteration", 0))
    tag = tag_for(iteration)
    tag_dir = os.path.join(out_dir, tag)
    _save_with_deepspeed(model, cfg, out_dir, tag)
    for rank in range(world_size):
        torch.save(rng.seeded(mix_seed(cfg.train.seed, iteration, rank)),
                   os.path.join(tag_dir, rng_file(rank)))
    with open(os.path.join(tag_dir, RUN_STATE), "w") as f:
        json.dump({"iteration": iteration,
                   "consumed_train_samples": int(meta.get("consumed_train_samples", 0)),
                   "world_size": world_size, "model_family": family, "weights_only": True,
                   "shape_config": shape_config or {}, "config": cfg.to_dict()}, f, indent=1)
    manifest.write(tag_dir, manifest.entries(tag_dir, manifest.listed_files(tag_dir)))
    write_pointer(out_dir, tag)
    return tag_dir


def _save_with_deepspeed(model: nn.Module, cfg: Config, out_dir: str, tag: str) -> None:
    """DeepSpeed writes the model files itself: a one-process engine (ZeRO-0, no optimizer,
    the model left on its device) saves `tag`: the non-expert `module` file and one file per
    global expert, which suit any expert-parallel size for a module-only load."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    from megatron_selfroute.parallel.layout import ParallelLayout, private_process_group

    single = Config.from_dict(cfg.to_dict())
    single.parallel.expert_model_parallel_size = 1
    single.parallel.tensor_model_parallel_size = 1
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    with private_process_group():
        import torch.distributed as dist

        if dist.get_world_size() != 1:
            raise CheckpointFormatError("write_deepspeed runs in one process")
        layout = ParallelLayout.single(single).build_groups()
        # DeepSpeedEngine as deepspeed.initialize builds it, but with dont_change_device: a
        # conversion never moves the model to a GPU.
        config_class = DeepSpeedConfig(config, layout)
        deepspeed.set_optimizer_flags(config_class, model)
        engine = DeepSpeedEngine(args=None, model=model, mpu=layout, dist_init_required=False,
                                 config=config, config_class=config_class,
                                 dont_change_device=True)
        engine.save_checkpoint(out_dir, tag=tag, client_state={}, save_latest=False)
