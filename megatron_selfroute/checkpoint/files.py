"""The on-disk layout of a `--save` directory and its pointer file.

    DIR/latest_checkpointed_iteration.txt   names the newest complete tag (replaced atomically)
    DIR/iter_0000100/                       a DeepSpeed tag directory (model, ZeRO, experts)
        mp_rank_00_model_states.pt          non-expert state (key `module`)
        layer_{l}_expert_{e}_mp_rank_00_model_states.pt   one file per (MoE layer, global expert)
        rng_state_rank{r}.pt                every rank's RNG states (`rng.py`)
        run_state.json                      iteration, consumed samples, layout, resolved config
"""
from __future__ import annotations

import os
import re
from typing import Optional

from megatron_selfroute.checkpoint import CheckpointFormatError

POINTER = "latest_checkpointed_iteration.txt"
MODEL_STATES = "mp_rank_00_model_states.pt"
RUN_STATE = "run_state.json"
TAG_RE = re.compile(r"iter_\d{7}")


def tag_for(iteration: int) -> str:
    """Directory name of the checkpoint at `iteration`."""
    return f"iter_{iteration:07d}"


def checkpoint_tags(save_dir: str) -> list[str]:
    """Complete-looking checkpoint directories (`iter_` + 7 digits), oldest first."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(n for n in names if TAG_RE.fullmatch(n)
                  and os.path.isdir(os.path.join(save_dir, n)))


def expert_file(moe_layer: int, expert: int) -> str:
    """DeepSpeed's name of one (MoE layer, global expert) file."""
    return f"layer_{moe_layer}_expert_{expert}_{MODEL_STATES}"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def read_pointer(save_dir: str) -> Optional[str]:
    """The tag the pointer file names, or None when `save_dir` holds no checkpoint; a pointer
    naming something that is not a tag directory is an error."""
    path = os.path.join(save_dir, POINTER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag or "/" in tag or tag in (".", "..") or not os.path.isdir(
            os.path.join(save_dir, tag)):
        raise CheckpointFormatError(f"{path} names {tag!r}, which is not a checkpoint directory")
    return tag


def write_pointer(save_dir: str, tag: str) -> None:
    """Point `save_dir` at `tag`: write a temporary file, fsync, rename over the pointer, fsync
    the directory (a crash leaves the old pointer or the new one, never a torn one)."""
    tmp = os.path.join(save_dir, POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, POINTER))
    fsync_dir(save_dir)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_save_or_tag_dir(path: str) -> bool:
    """True for a tag directory or a `--save` directory with a pointer file."""
    return os.path.isfile(os.path.join(path, MODEL_STATES)) or os.path.isfile(
        os.path.join(path, POINTER))


def resolve_tag_dir(path: str) -> str:
    """The tag directory of `path` (itself, or the one its pointer file names)."""
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        return path
    if not os.path.isfile(os.path.join(path, POINTER)):
        raise CheckpointFormatError(f"{path}: neither a tag directory ({MODEL_STATES}) nor a "
                                    f"save directory ({POINTER})")
    tag = read_pointer(path)
    tag_dir = os.path.join(path, tag)
    if not os.path.isfile(os.path.join(tag_dir, MODEL_STATES)):
        raise CheckpointFormatError(f"{os.path.join(path, POINTER)} names {tag!r}, which holds "
                                    f"no {MODEL_STATES}")
    return tag_dir
