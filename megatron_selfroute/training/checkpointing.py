"""Atomic, exactly-resumable checkpoints through the DeepSpeed engine.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt   this project's pointer (replaced atomically)
    DIR/iter_0000100/                       a DeepSpeed tag directory (model, ZeRO, experts)
        rng_state_rank{r}.pt                every rank's RNG states (tensors and ints only)
        run_state.json                      iteration, consumed samples, the resolved config

Saving writes into `iter_XXXXXXX.tmp` with DeepSpeed's `save_latest=False` (DeepSpeed's own
`latest` file is written by rank 0 before other ranks finish), then after a barrier rank 0 renames
the directory into place and replaces the pointer with `os.replace`. A crash at any moment leaves
the previous checkpoint and pointer intact. Loading goes through `SafeCheckpointEngine`
(`torch.load(weights_only=True)` with an allow-list).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_selfroute.checkpoint import CheckpointError, CheckpointLoadError
from megatron_selfroute.checkpoint import rng as rng_codec
from megatron_selfroute.checkpoint.files import (
    RUN_STATE,
    read_pointer,
    rng_file,
    tag_for,
    write_pointer,
)
from megatron_selfroute.checkpoint.safe_load import safe_load
from megatron_selfroute.config import Config
from megatron_selfroute.parallel.layout import ParallelLayout

__all__ = ["CheckpointError", "ResumeState", "check_compatible", "load_checkpoint",
           "read_pointer", "save_checkpoint", "tag_for"]

# Fields whose change makes a checkpoint incompatible (shape or routing semantics).
_MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
               "vocab_size", "make_vocab_size_divisible_by", "disable_bias_linear",
               "disable_bias_layernorm", "untie_embeddings_and_output_weights",
               "max_position_embeddings")
_MOE_KEYS = ("num_experts", "router_type", "moe_ffn_hidden_size", "moe_layer_freq",
             "moe_router_score_function", "moe_router_enable_expert_bias",
             "moe_shared_expert_intermediate_size")


@dataclass
class ResumeState:
    """Where training continues."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_steps: int = 0
    weights_loaded: bool = False  # set by load_checkpoint (not saved)


def save_checkpoint(engine, save_dir: str, cfg: Config, state: ResumeState,
                    layout: ParallelLayout, shape_config: Optional[dict] = None,
                    family: str = "gpt") -> str:
    """Save atomically; returns the final directory. Called by every rank."""
    rank = layout.rank
    final = tag_for(state.iteration)
    tmp = final + ".tmp"
    tmp_path = os.path.join(save_dir, tmp)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp_path):  # leftover of a crashed save
            shutil.rmtree(tmp_path)
    dist.barrier()
    engine.save_checkpoint(save_dir, tag=tmp, client_state={}, save_latest=False)
    torch.save(rng_codec.capture(), os.path.join(tmp_path, rng_file(rank)))
    if rank == 0:
        run_state = {"iteration": state.iteration,
                     "consumed_train_samples": state.consumed_train_samples,
                     "skipped_steps": state.skipped_steps,
                     "world_size": layout.world_size, "layout": layout.describe(),
                     "config": cfg.to_dict(),
                     "shape_config": shape_config or {}, "model_family": family}
        with open(os.path.join(tmp_path, RUN_STATE), "w") as f:
            json.dump(run_state, f, indent=1)
    dist.barrier()
    if rank == 0:
        final_path = os.path.join(save_dir, final)
        old = final_path + ".old"
        if os.path.exists(final_path):
            os.replace(final_path, old)
        os.replace(tmp_path, final_path)
        write_pointer(save_dir, final)
        if os.path.exists(old):
            shutil.rmtree(old)
    dist.barrier()
    return os.path.join(save_dir, final)


def check_compatible(saved: dict, cfg: Config, path: str) -> None:
    """Refuse a checkpoint of another model shape or router type, naming the field."""
    from megatron_selfroute.moe.router import ROUTERS

    router_keys = tuple(dict.fromkeys(f for r in ROUTERS.values() for f in r.checkpoint_fields))
    for sec, keys in (("model", _MODEL_KEYS), ("moe", _MOE_KEYS + router_keys)):
        defaults = {f.name: f.default for f in dataclasses.fields(getattr(Config(), sec))}
        for key in keys:
            # A field newer than the checkpoint had its default when the checkpoint was written.
            old = saved.get(sec, {}).get(key, defaults[key])
            new = getattr(getattr(cfg, sec), key)
            if old != new:
                flag = "--" + key.replace("_", "-")
                raise CheckpointError(f"{path} was trained with {flag} {old}, this run has "
                                      f"{flag} {new}")
    old_ep = saved.get("parallel", {}).get("expert_model_parallel_size")
    if old_ep != cfg.parallel.expert_model_parallel_size:
        raise CheckpointError(
            f"{path} has --expert-model-parallel-size {old_ep}, this run "
            f"{cfg.parallel.expert_model_parallel_size}; convert it with "
            "tools/checkpoint/convert.py")


def load_checkpoint(engine, load_dir: str, cfg: Config, layout: ParallelLayout,
                    shape_config: Optional[dict] = None) -> Optional[ResumeState]:
    """Restore model, optimizer, RNG and position; None when `load_dir` holds no checkpoint."""
    tag = read_pointer(load_dir)
    if tag is None:
        return None
    path = os.path.join(load_dir, tag)
    try:
        with open(os.path.join(path, RUN_STATE)) as f:
            run_state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{RUN_STATE}: not a checkpoint of this project ({e})"
                              ) from None
    check_compatible(run_state["config"], cfg, path)
    for key, new in (shape_config or {}).items():
        old = run_state.get("shape_config", {}).get(key)
        if old != new:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{path} was trained with {flag} {old}, this run has "
                                  f"{flag} {new}")
    tr = cfg.train
    world = layout.world_size
    module_only = tr.finetune or tr.no_load_optim
    if run_state["world_size"] != world and not module_only:
        raise CheckpointError(f"{path} was saved by {run_state['world_size']} processes, this run "
                              f"has {world}; pass --no-load-optim or --finetune to load weights "
                              "only")
    try:
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False,
                                              load_module_only=module_only)
    except CheckpointLoadError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {first})") from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no model states")
    if tr.finetune:
        return ResumeState(0, 0, weights_loaded=True)
    if not tr.no_load_rng:
        rng_path = os.path.join(path, rng_file(layout.rank))
        if not os.path.isfile(rng_path):
            raise CheckpointError(f"{rng_path} is missing (use --no-load-rng to skip)")
        rng_codec.restore(safe_load(rng_path))
    return ResumeState(run_state["iteration"], run_state["consumed_train_samples"],
                       run_state.get("skipped_steps", 0), weights_loaded=True)
