"""Move a training checkpoint between layouts with its optimizer state (issue 20).

ZeRO partitions a flat buffer of each parameter group over the (expert-)data-parallel ranks, and
tensor parallelism shards the parameters themselves, so a DeepSpeed checkpoint's optimizer files
only load into the layout that wrote them. The layout-free form is the consolidated checkpoint
plus `optimizer.safetensors`: for every parameter under its one-device name (global expert ids,
the tied output layer once) its fp32 master weight (`<name>::master`) and Adam's two moments
(`<name>::exp_avg`, `<name>::exp_avg_sq`), with Adam's step count, the iteration, the consumed
samples and the skipped steps in the header.

Both directions run the real engine, on CPU, in the world of the layout they read or write
(`run_world` starts the processes, as `tools/checkpoint/convert.py` does), so DeepSpeed itself
places every value:

- export: the source world loads the checkpoint with its optimizer states
  (`engine.load_checkpoint`), reads each parameter's master and moments through DeepSpeed's
  public accessors (`deepspeed.utils.safe_get_full_fp32_param` /
  `safe_get_full_optimizer_state`, which reassemble a ZeRO-1/2 partition), and rank 0 puts the
  tensor-parallel shards back (each shard's own `tp_shard`) and the experts under their global
  ids;
- import: the target world builds its engine, gives every rank its slice of each tensor
  (`tp_shard`, its experts) through `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`
  (or the optimizer's own state for ZeRO-0), and saves with the trainer's atomic
  `save_checkpoint`: the result is an ordinary checkpoint of the new layout that resumes with
  its optimizer.

The processes use DeepSpeed's CPU accelerator and gloo even on a GPU machine; each holds its own
shard of the model and optimizer, and export sends rank 0 one copy of every tensor (the
consolidated checkpoint's size).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_selfroute.checkpoint import CheckpointFormatError
from megatron_selfroute.checkpoint.adapters import EXPERT_MARK, FAMILIES
from megatron_selfroute.cli import first_line

OPTIMIZER = "optimizer.safetensors"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
META_KEYS = ("step", "iteration", "consumed_train_samples", "skipped_steps")


def has_optimizer_state(path: str) -> bool:
    """A consolidated directory that carries `optimizer.safetensors`."""
    return os.path.isfile(os.path.join(path, OPTIMIZER))


# ---- names ---------------------------------------------------------------------------------

def global_name(model: nn.Module, name: str) -> str:
    """One-device name of a (local) parameter or buffer: a local expert's index becomes its
    global expert id."""
    if EXPERT_MARK not in name:
        return name
    head, tail = name.split(EXPERT_MARK, 1)
    local, rest = tail.split(".", 1)
    experts = model.get_submodule(head + ".deepspeed_moe.experts")
    return f"{head}{EXPERT_MARK}{experts.global_id(int(local))}.{rest}"


# ---- the optimizer DeepSpeed built ---------------------------------------------------------

def _kind(engine) -> str:
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return "zero"  # DeepSpeedZeroOptimizer (ZeRO-1/2, fp32 or bf16)
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        return "unfused"  # FP16_UnfusedOptimizer (ZeRO-0 bf16)
    if isinstance(opt, torch.optim.Optimizer):
        return "torch"  # ZeRO-0 fp32: the AdamW itself
    raise CheckpointFormatError(f"the optimizer {type(opt).__name__} has no resharding path")


def _masters(engine) -> dict[int, Tensor]:
    """id(model parameter) -> its fp32 master, for the optimizers that keep whole masters."""
    opt = engine.optimizer
    if _kind(engine) == "unfused":
        return {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                for lp, hp in zip(lg, hg, strict=True)}
    return {id(p): p for p in engine.module.parameters()}


def _base_state(engine) -> dict:
    opt = engine.optimizer
    return opt.optimizer.state if _kind(engine) in ("zero", "unfused") else opt.state


def _link_zero_state(engine) -> None:
    """Point every parameter's fragment at the flat partitions' optimizer state (DeepSpeed
    links it lazily after its first step, and not after a checkpoint load)."""
    opt = engine.optimizer
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _adam_step(engine) -> int:
    steps = {float(s["step"]) for s in _base_state(engine).values() if "step" in s}
    if not steps:
        raise CheckpointFormatError("the optimizer holds no state yet (a checkpoint saved "
                                    "before the first optimizer step)")
    if len(steps) != 1:
        raise CheckpointFormatError(f"the optimizer's parameter groups disagree on Adam's step "
                                    f"count ({sorted(steps)})")
    return int(steps.pop())


def local_optimizer_state(engine) -> dict[str, dict[str, Tensor]]:
    """This rank's parameters (local names): fp32 master and both moments, each of the
    parameter's local (tensor-parallel shard) shape. Collective over the ZeRO partition groups
    (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    kind = _kind(engine)
    if kind == "zero":
        _link_zero_state(engine)
    masters, state = _masters(engine), _base_state(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if kind == "zero":
            vals = {"master": safe_get_full_fp32_param(p),
                    "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        else:
            hp = masters[id(p)]
            st = state.get(hp, {})
            if "exp_avg" not in st:
                raise CheckpointFormatError(f"{name}: no Adam state in the optimizer")
            vals = {"master": hp, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        out[name] = {k: v.detach().float().cpu().reshape(p.shape).clone()
                     for k, v in vals.items()}
    return out


def _sends(layout, name: str) -> bool:
    """Whether this rank contributes `name` to the gathered state: dense tensors from the first
    data-parallel replica (each TP rank its shard), experts from the first expert-data replica
    of each expert-parallel rank."""
    if EXPERT_MARK in name:
        return layout.edp_rank == 0
    return layout.dp_rank == 0


def gather_optimizer_state(engine, layout) -> Optional[dict[str, Tensor]]:
    """Every rank calls it; rank 0 returns the one-device `optimizer.safetensors` tensors
    ({"<name>::<key>": tensor}), the others None."""
    from megatron_selfroute.parallel.tensor_parallel import (
        full_shape,
        is_tp_sharded,
        place_shard,
        shard_positions,
    )

    model = engine.module
    local = local_optimizer_state(engine)
    params = dict(model.named_parameters())
    mine = {}
    for name, vals in local.items():
        if not _sends(layout, name):
            continue
        p = params[name]
        where = shard_positions(p) if is_tp_sharded(p) else None
        mine[global_name(model, name)] = (where, tuple(full_shape(p)), vals)
    parts = [None] * layout.world_size
    if layout.world_size == 1:
        parts = [mine]
    else:
        dist.gather_object(mine, parts if layout.rank == 0 else None, dst=0)
    if layout.rank != 0:
        return None
    full: dict[str, Tensor] = {}
    for part in parts:
        for name, (where, shape, vals) in part.items():
            for key, t in vals.items():
                if where is None:
                    full[f"{name}::{key}"] = t.contiguous()
                    continue
                dst = full.setdefault(f"{name}::{key}", torch.zeros(shape, dtype=t.dtype))
                place_shard(dst, where, t)
    return full


# ---- import ----------------------------------------------------------------------------------

class _Lazy:
    """`get(name)` of an open safetensors file: a tensor read when asked for, else None."""

    def __init__(self, f):
        self.f, self.names = f, set(f.keys())

    def get(self, name: str) -> Optional[Tensor]:
        return self.f.get_tensor(name) if name in self.names else None


def _shard_for(name: str, full: Tensor, owners: dict) -> Tensor:
    """This rank's piece of the one-device tensor `full` for local parameter/buffer `name`
    (`owners`: the parameter each name is sharded like, a ViT's EMA buffers included)."""
    from megatron_selfroute.parallel.tensor_parallel import shard_full_tensor

    owner = owners.get(name)
    return full if owner is None else shard_full_tensor(owner, full)


def restore(engine, weights, optim, step: int) -> None:
    """Give this rank its slice of the one-device `weights` (every parameter and buffer) and,
    when `optim` is given, of every master and moment, with Adam's `step`; both are mappings
    with `get(name)` (a dict, or `_Lazy`). No collectives."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron_selfroute.models.vit import ema_buffer_name

    model = engine.module
    params = dict(model.named_parameters())
    owners = {**{ema_buffer_name(n): p for n, p in params.items()}, **params}
    missing, loaded = [], set()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in loaded:
                continue  # a tied output layer: the input embedding's tensor, loaded once
            g = global_name(model, name)
            src = weights.get(g)
            if src is None:
                missing.append(g)
                continue
            piece = _shard_for(name, src, owners)
            if tuple(piece.shape) != tuple(t.shape):
                raise CheckpointFormatError(f"{g}: this layout's piece has shape "
                                            f"{tuple(t.shape)}, the checkpoint gives "
                                            f"{tuple(piece.shape)}")
            t.copy_(piece.to(t.dtype))
            loaded.add(id(t))
    if missing:
        raise CheckpointFormatError(f"the checkpoint lacks {len(missing)} tensors of this model "
                                    f"(e.g. {missing[0]})")
    if optim is None:
        return
    kind = _kind(engine)
    state = _base_state(engine)
    if kind == "zero":  # Adam's state on each flat partition, then linked to the fragments
        for flat in engine.optimizer.single_partition_of_fp32_groups:
            state[flat] = {"step": torch.tensor(float(step)),
                           "exp_avg": torch.zeros_like(flat),
                           "exp_avg_sq": torch.zeros_like(flat)}
        _link_zero_state(engine)
    masters = _masters(engine)
    with torch.no_grad():
        for name, p in params.items():
            if not p.requires_grad:
                continue
            g = global_name(model, name)
            vals = {}
            for key in STATE_KEYS:
                full = optim.get(f"{g}::{key}")
                if full is None:
                    raise CheckpointFormatError(f"{OPTIMIZER} has no {key} of {g}")
                piece = _shard_for(name, full, owners)
                if tuple(piece.shape) != tuple(p.shape):
                    raise CheckpointFormatError(f"{OPTIMIZER}: {g}::{key} gives this layout a "
                                                f"piece of shape {tuple(piece.shape)}, the "
                                                f"parameter has {tuple(p.shape)}")
                vals[key] = piece.float()
            p.copy_(vals["master"].to(p.dtype))
            if kind == "zero":
                safe_set_full_fp32_param(p, vals["master"])
                safe_set_full_optimizer_state(p, vals["exp_avg"], "exp_avg")
                safe_set_full_optimizer_state(p, vals["exp_avg_sq"], "exp_avg_sq")
                continue
            hp = masters[id(p)]
            hp.copy_(vals["master"])
            st = state.setdefault(hp, {})
            st["step"] = torch.tensor(float(step), device=hp.device)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].copy_(vals[key])
                else:
                    st[key] = vals[key].to(hp.device).clone()


# ---- the processes ---------------------------------------------------------------------------

def _build(job: dict):
    """Config, layout and engine of the job's layout, on this rank."""
    from megatron_selfroute.config import Config
    from megatron_selfroute.parallel.engine import build_engine
    from megatron_selfroute.parallel.layout import ParallelLayout, init_distributed
    from megatron_selfroute.training.loop import resolve_config

    init_distributed("gloo", 30.0)
    cfg = Config.from_dict(job["config"])
    cfg.train.load = cfg.train.save = None
    if cfg.train.train_iters is None and cfg.train.train_samples is None:
        cfg.train.train_iters = 1  # an imported model (Hugging Face) has no schedule
    layout = ParallelLayout.from_config(cfg, check=False)
    layout.validate(cfg)
    layout.build_groups()
    cfg = resolve_config(cfg, layout)
    extra = None
    if cfg.parallel.deepspeed_config:  # its ZeRO options shape the flat partitions
        from megatron_selfroute.parallel.engine import merge_deepspeed_json

        extra = merge_deepspeed_json(cfg, cfg.parallel.deepspeed_config, set())
    model = FAMILIES[job["family"]].build_parallel(cfg, job.get("shape") or {}, layout)
    return cfg, layout, build_engine(model, cfg, layout, extra)


def _export(job: dict) -> None:
    from safetensors.torch import save_file

    from megatron_selfroute.checkpoint.files import resolve_tag_dir

    cfg, layout, engine = _build(job)
    tag_dir = resolve_tag_dir(job["input"])  # verified by the converter before it got here
    save_dir, tag = os.path.dirname(tag_dir), os.path.basename(tag_dir)
    try:
        engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise CheckpointFormatError(f"{tag_dir}: its optimizer states do not load "
                                    f"({first_line(e)})") from None
    step = _adam_step(engine)
    full = gather_optimizer_state(engine, layout)
    if layout.rank == 0:
        meta = {k: str(v) for k, v in job["meta"].items()}
        meta.update(format="pt", step=str(step))
        save_file(full, os.path.join(job["output"], OPTIMIZER), metadata=meta)


def _import(job: dict) -> None:
    from safetensors import safe_open

    from megatron_selfroute.checkpoint.consolidated import WEIGHTS
    from megatron_selfroute.seeding import mix_seed
    from megatron_selfroute.training import checkpointing

    cfg, layout, engine = _build(job)
    src = job["input"]
    meta = dict(job["meta"])
    with safe_open(os.path.join(src, WEIGHTS), "pt") as wf:
        optim = None
        if job.get("optimizer"):
            optim = safe_open(os.path.join(src, OPTIMIZER), "pt")
            header = optim.metadata() or {}
            if "step" not in header:
                raise CheckpointFormatError(f"{OPTIMIZER}: no Adam step in its header")
            meta.update({k: int(header[k]) for k in META_KEYS if k in header})
        # each rank reads only the tensors it needs, one at a time
        restore(engine, _Lazy(wf), None if optim is None else _Lazy(optim),
                int(meta.get("step", 0)))
    state = checkpointing.ResumeState(int(meta.get("iteration", 0)),
                                      int(meta.get("consumed_train_samples", 0)),
                                      int(meta.get("skipped_steps", 0)))
    engine.global_steps = state.iteration
    engine.global_samples = state.consumed_train_samples
    torch.manual_seed(mix_seed(cfg.train.seed, state.iteration, layout.rank))
    checkpointing.save_checkpoint(engine, job["output"], cfg, state, layout,
                                  job.get("shape") or {}, job["family"],
                                  extra_run_state=None if job.get("optimizer")
                                  else {"weights_only": True})


def _worker(job_path: str) -> None:
    from megatron_selfroute.parallel.groups import shutdown

    with open(job_path) as f:
        job = json.load(f)
    try:
        (_export if job["mode"] == "export" else _import)(job)
        shutdown()
    except Exception as e:  # noqa: BLE001 - one line for the parent, the traceback in the log
        from megatron_selfroute.config import ConfigError

        if not isinstance(e, (CheckpointFormatError, ConfigError)):
            traceback.print_exc()
        print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
        os._exit(1)


def _last_error(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        text = [ln for ln in f.read().splitlines() if ln.strip()]
    errors = [ln for ln in text if ln.startswith("error: ")]
    if errors:
        return errors[0][len("error: "):]
    return (text[-1] if text else "no output") + f" (log: {log_path})"


def run_world(job: dict, world_size: int, timeout: float = 3600.0) -> None:
    """Run `job` (export or import) on `world_size` CPU processes of gloo; raises
    CheckpointFormatError naming the first rank that failed (its error line, a signal, or the
    timeout). The processes never outlive this call."""
    import signal
    import time

    from megatron_selfroute.parallel.layout import _free_port, launcher_env

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    what = f"{job['mode']} on {world_size} processes"
    with tempfile.TemporaryDirectory(prefix="msr_reshard_") as tmp:
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        port = _free_port()
        procs = []
        try:
            for rank in range(world_size):
                env = dict(os.environ, **launcher_env(rank, world_size, port),
                           DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
                           OMP_NUM_THREADS="1", PYTHONPATH=path)
                with open(os.path.join(tmp, f"rank{rank}.log"), "w") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "megatron_selfroute.checkpoint.reshard",
                         job_path], env=env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in procs]
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    rank, code = bad[0]
                    log = os.path.join(tmp, f"rank{rank}.log")
                    why = (f"killed by signal {signal.Signals(-code).name}" if code < 0
                           else _last_error(log))
                    raise CheckpointFormatError(f"{what} failed on rank {rank}: {why}")
                if all(c == 0 for c in codes):
                    return
                if time.monotonic() > deadline:
                    raise CheckpointFormatError(f"{what} timed out after {timeout:.0f} s")
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    _worker(sys.argv[1])
