"""Atomic, exactly-resumable checkpoints through the DeepSpeed engine.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt   this project's pointer (replaced atomically)
    DIR/iter_0000100/                       a DeepSpeed tag directory (model, ZeRO, experts)
        rng_state_rank{r}.pt                every rank's RNG states (tensors and ints only)
        run_state.json                      iteration, consumed samples, the resolved config

        manifest.json                       every file's size and CRC-32s (`checkpoint/manifest.py`)

Saving writes into `iter_XXXXXXX.tmp` with DeepSpeed's `save_latest=False` (DeepSpeed's own
`latest` file is written by rank 0 before other ranks finish). Every file is fsynced, and a failed
write (full disk, I/O error) is recorded instead of raised (`checkpoint/writes.py`); the ranks then
agree (all-gather) whether every write succeeded. Only then are the files checksummed into the
manifest (each rank a share), the directory renamed into place by rank 0 and the pointer replaced
with `os.replace`; otherwise the partial directory is removed and every rank raises
`CheckpointSaveError` (the caller stops, or goes on under --continue-on-save-failure). A crash at
any moment leaves the previous checkpoint and pointer intact; --keep-last deletes older
checkpoints only after the pointer names the new one. Loading verifies the manifest first (each
rank a share; --load-fallback goes back to the newest earlier checkpoint that verifies), then goes
through `SafeCheckpointEngine` (`torch.load(weights_only=True)` with an allow-list).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_selfroute.checkpoint import CheckpointError, CheckpointLoadError, manifest, writes
from megatron_selfroute.checkpoint import rng as rng_codec
from megatron_selfroute.checkpoint.files import (
    POINTER,
    RUN_STATE,
    checkpoint_tags,
    read_pointer,
    rng_file,
    tag_for,
    write_pointer,
)
from megatron_selfroute.checkpoint.safe_load import safe_load
from megatron_selfroute.checkpoint.writes import disk_fault_from_env, json_save, torch_save
from megatron_selfroute.cli import first_line
from megatron_selfroute.config import Config
from megatron_selfroute.parallel.layout import ParallelLayout
from megatron_selfroute.training.logging import print_rank0

__all__ = ["CheckpointError", "CheckpointSaveError", "LeaseLostError", "ResumeState",
           "check_compatible", "load_checkpoint", "read_pointer", "save_checkpoint", "tag_for"]

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


class CheckpointSaveError(CheckpointError):
    """A save that did not complete on every rank; the previous checkpoint is intact."""


class LeaseLostError(CheckpointSaveError):
    """Another run holds the lease on --save now: this run must not write there again."""


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_failure(errors: list, what: str) -> Optional[str]:
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if not bad:
        return None
    rank, err = bad[0]
    more = f" (and on {len(bad) - 1} more ranks)" if len(bad) > 1 else ""
    return f"{what} failed on rank {rank}: {err}{more}"


def _remove_tree(path: str) -> None:
    """Rename out of the checkpoint namespace first, then delete (a crash mid-delete leaves a
    `.deleted` directory nobody loads)."""
    gone = path + ".deleted"
    try:
        os.replace(path, gone)
    except OSError:
        gone = path
    shutil.rmtree(gone, ignore_errors=True)


def prune(save_dir: str, keep_last: int, current: str) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints (never `current`); returns the
    deleted tags."""
    # only checkpoints older than the new one: tags above it (a run resumed from an earlier
    # checkpoint, e.g. by --load-fallback past a damaged one) are left alone
    tags = [t for t in checkpoint_tags(save_dir) if t < current]
    doomed = tags[:max(len(tags) - (keep_last - 1), 0)]
    for tag in doomed:
        _remove_tree(os.path.join(save_dir, tag))
    return doomed


def _guard_recovery_script(engine, ckpt_engine) -> None:
    """DeepSpeed copies its zero_to_fp32.py into --save with a plain copyfile on rank 0; on a
    full disk that raised out of the save on rank 0 alone (the others hung in DeepSpeed's
    barrier). Record it as a failed write instead (once per engine)."""
    orig = getattr(engine, "_copy_recovery_script", None)
    if orig is None or getattr(orig, "_guarded", False):
        return

    def guarded(save_path, *args, **kwargs):
        try:
            return orig(save_path, *args, **kwargs)
        except OSError as e:
            ckpt_engine.failures.append(writes.describe(e, save_path))

    guarded._guarded = True
    engine._copy_recovery_script = guarded


def save_checkpoint(engine, save_dir: str, cfg: Config, state: ResumeState,
                    layout: ParallelLayout, shape_config: Optional[dict] = None,
                    family: str = "gpt", lease=None,
                    extra_run_state: Optional[dict] = None) -> str:
    """Save atomically and verifiably; returns the final directory. Called by every rank.

    Every rank reports whether its writes succeeded; only when all did are the files
    checksummed (each rank a share) into the manifest, the directory renamed into place and the
    pointer moved; otherwise the partial directory is removed and CheckpointSaveError names the
    first failure (the previous checkpoint stays the one the pointer names).
    """
    rank, world = layout.rank, layout.world_size
    final = tag_for(state.iteration)
    tmp = final + ".tmp"
    tmp_path = os.path.join(save_dir, tmp)
    previous = None
    msg = lease_msg = None
    if rank == 0:
        msg = lease_msg = lease.check() if lease is not None else None
        if msg is None:
            try:
                os.makedirs(save_dir, exist_ok=True)
                previous = read_pointer(save_dir)
                if os.path.exists(tmp_path):  # leftover of a crashed save
                    shutil.rmtree(tmp_path)
            except (OSError, CheckpointError) as e:
                msg = f"preparing {tmp_path} failed: {e}"
    msg, lease_msg, previous = _broadcast((msg, lease_msg, previous), world)
    if lease_msg is not None:
        raise LeaseLostError(lease_msg)
    if msg is not None:
        raise CheckpointSaveError(f"checkpoint {final} was not saved: {msg}")
    intact = (f"{os.path.join(save_dir, POINTER)} still names {previous} (intact)" if previous
              else "no earlier checkpoint exists")
    fault = disk_fault_from_env(state.iteration, rank)
    ckpt_engine = engine.checkpoint_engine
    _guard_recovery_script(engine, ckpt_engine)
    ckpt_engine.begin_save(fault)
    engine.save_checkpoint(save_dir, tag=tmp, client_state={}, save_latest=False)
    failures = ckpt_engine.end_save()
    if not failures:
        err = torch_save(rng_codec.capture(getattr(engine.module, "tp_rng", None)),
                         os.path.join(tmp_path, rng_file(rank)), fault)
        if err is None and rank == 0:
            run_state = {"iteration": state.iteration,
                         "consumed_train_samples": state.consumed_train_samples,
                         "skipped_steps": state.skipped_steps,
                         "world_size": layout.world_size, "layout": layout.describe(),
                         "config": cfg.to_dict(),
                         "shape_config": shape_config or {}, "model_family": family,
                         **(extra_run_state or {})}
            err = json_save(run_state, os.path.join(tmp_path, RUN_STATE), fault)
        failures = [err] if err else []
    msg = _first_failure(_gather(failures[0] if failures else None, world), "writing")
    if msg is None:  # every file is there: each rank checksums a share for the manifest
        # rank 0 lists the directory for everyone (another node's cached listing may lag)
        names = _broadcast(manifest.listed_files(tmp_path) if rank == 0 else None, world)
        try:
            part, err = manifest.entries(tmp_path, names[rank::world]), None
        except OSError as e:
            part, err = {}, f"reading back {e.filename}: {e.strerror}"
        parts = _gather((part, err), world)
        msg = _first_failure([p[1] for p in parts], "checksumming")
    deleted: list[str] = []
    if rank == 0:
        if msg is None:
            try:
                manifest.write(tmp_path, {k: v for p in parts for k, v in p[0].items()})
                final_path = os.path.join(save_dir, final)
                old = final_path + ".old"
                if os.path.exists(final_path):
                    os.replace(final_path, old)
                os.replace(tmp_path, final_path)
                write_pointer(save_dir, final)
                if os.path.exists(old):
                    shutil.rmtree(old)
            except OSError as e:
                msg = f"finishing the save on rank 0 failed: {writes.describe(e, tmp_path)}"
                if os.path.exists(old) and not os.path.exists(final_path):
                    os.replace(old, final_path)  # put a re-saved tag's previous copy back
        if msg is not None:
            _remove_tree(tmp_path)
        elif cfg.train.keep_last:
            deleted = prune(save_dir, cfg.train.keep_last, final)
    msg, deleted = _broadcast((msg, deleted), world)
    if msg is not None:
        raise CheckpointSaveError(f"checkpoint {final} was not saved: {msg}; {intact}")
    if deleted:
        print_rank0(f"> --keep-last {cfg.train.keep_last}: deleted {', '.join(deleted)}")
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
            "tools/checkpoint/convert.py --to deepspeed --optimizer-state "
            f"--expert-model-parallel-size {cfg.parallel.expert_model_parallel_size} and this "
            "run's --tensor-model-parallel-size and --world-size")


def _interrupted_first_save(load_dir: str) -> Optional[str]:
    """A kill between a save's rename and its pointer update leaves a complete checkpoint (it
    has a manifest, written before the rename) without a pointer: resume from the newest such
    one, as the pointer would have named it."""
    complete = [t for t in checkpoint_tags(load_dir)
                if os.path.isfile(os.path.join(load_dir, t, manifest.MANIFEST))]
    if not complete:
        return None
    print_rank0(f"> {load_dir} has no {POINTER} but a complete checkpoint {complete[-1]} (a "
                "save was interrupted before its pointer update): resuming from it")
    return complete[-1]


def _refuse_other_kinds(load_dir: str) -> None:
    """A --load path without a pointer file starts from scratch (Megatron's behaviour) only
    when it holds no checkpoint of another kind: those are errors, not silent fresh starts."""
    flag = f"--load {load_dir}"
    if os.path.isfile(load_dir):
        raise CheckpointError(f"{flag} is a file; pass the --save directory of a training run")
    if not os.path.isdir(load_dir):
        return
    if os.path.isfile(os.path.join(load_dir, RUN_STATE)):
        raise CheckpointError(f"{flag} is one checkpoint (tag) directory; pass its parent "
                              f"{os.path.dirname(os.path.abspath(load_dir))} (the --save "
                              "directory, whose pointer file names it)")
    if any(os.path.isfile(os.path.join(load_dir, n)) for n in
           ("model.safetensors", "model.safetensors.index.json", "config.json")):
        raise CheckpointError(f"{flag} is a consolidated or Hugging Face checkpoint; convert it "
                              "with tools/checkpoint/convert.py --to deepspeed (add "
                              "--optimizer-state when it holds optimizer.safetensors, else "
                              "--load the output with --no-load-optim)")
    tags = checkpoint_tags(load_dir)
    if tags:
        raise CheckpointError(f"{flag} holds {', '.join(tags[-3:])} but no {POINTER}; write the "
                              "tag to resume from into it")


def verify_shared(tag_dir: str, layout: ParallelLayout) -> Optional[str]:
    """Verify `tag_dir` against its manifest, each rank a share of the files; every rank gets
    the same answer: None (verified, or no manifest: an older checkpoint) or the first
    problem."""
    rank, world = layout.rank, layout.world_size
    try:
        doc = manifest.read(tag_dir)
        names = sorted(doc["files"]) if doc is not None else []
        bad = manifest.problems(tag_dir, names[rank::world]) if doc is not None else []
        if rank == 0 and doc is not None:
            for extra in manifest.unlisted(tag_dir, doc):  # harmless to loading: said only
                print_rank0(f"> note: {extra}")
        err = bad[0] if bad else None
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - a malformed manifest entry: every rank must gather
        err = f"{tag_dir}/{manifest.MANIFEST}: malformed ({type(e).__name__}: {e})"
    errors = _gather(err, world)
    bad = [e for e in errors if e]
    return bad[0] if bad else None


def choose_verified(load_dir: str, tag: str, layout: ParallelLayout, fallback: bool) -> str:
    """The pointer's tag when it verifies; with --load-fallback the newest earlier one that
    does; otherwise CheckpointError naming the damage."""
    problem = verify_shared(os.path.join(load_dir, tag), layout)
    if problem is None:
        if manifest.read(os.path.join(load_dir, tag)) is None:
            print_rank0(f"> {os.path.join(load_dir, tag)} has no manifest (written before "
                        "manifests existed): loaded unverified")
        return tag
    if not fallback:
        raise CheckpointError(f"{problem}; --load-fallback loads the newest earlier checkpoint "
                              "that verifies, tools/checkpoint/verify.py checks them all")
    for older in reversed([t for t in checkpoint_tags(load_dir) if t < tag]):
        print_rank0(f"> --load-fallback: {os.path.join(load_dir, tag)} is damaged ({problem}); "
                    f"trying {older}")
        tag = older
        problem = verify_shared(os.path.join(load_dir, tag), layout)
        if problem is None:
            print_rank0(f"> --load-fallback: loading {os.path.join(load_dir, tag)} (the pointer "
                        "file still names the damaged checkpoint until the next save)")
            return tag
    raise CheckpointError(f"{problem}; --load-fallback found no earlier checkpoint in "
                          f"{load_dir} that verifies")


def load_checkpoint(engine, load_dir: str, cfg: Config, layout: ParallelLayout,
                    shape_config: Optional[dict] = None) -> Optional[ResumeState]:
    """Restore model, optimizer, RNG and position; None when `load_dir` holds no checkpoint."""
    tag = read_pointer(load_dir)
    if tag is None:
        tag = _interrupted_first_save(load_dir)
    if tag is None:
        _refuse_other_kinds(load_dir)
        return None
    tag = choose_verified(load_dir, tag, layout, cfg.train.load_fallback)
    path = os.path.join(load_dir, tag)
    try:
        with open(os.path.join(path, RUN_STATE)) as f:
            run_state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{RUN_STATE}: not a checkpoint of this project ({e})"
                              ) from None
    check_compatible(run_state["config"], cfg, path)
    saved_tp = run_state.get("layout", {}).get("tp", 1)  # older checkpoints: no TP
    if saved_tp != layout.tp:
        was = run_state.get("layout", {})
        raise CheckpointError(
            f"{path} was saved in layout TP {saved_tp} x DP {was.get('dp', '?')} (EP "
            f"{was.get('ep', '?')}), this run is TP {layout.tp} x DP {layout.dp} (EP "
            f"{layout.ep}): tensor-parallel shards do not load into another TP degree "
            f"(resume with --tensor-model-parallel-size {saved_tp}, or convert it with "
            "tools/checkpoint/convert.py --to deepspeed --optimizer-state "
            f"--tensor-model-parallel-size {layout.tp} --expert-model-parallel-size "
            f"{layout.ep} --world-size {layout.world_size})")
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
                              f"has {world}; convert it with tools/checkpoint/convert.py --to "
                              f"deepspeed --optimizer-state --world-size {world} (and this run's "
                              "--tensor-model-parallel-size and --expert-model-parallel-size) "
                              "to keep the optimizer, or pass --no-load-optim or --finetune to "
                              "load weights only")
    if not module_only and run_state.get("weights_only"):
        raise CheckpointError(f"{path} has no optimizer states (a converted checkpoint holds "
                              "weights only); add --no-load-optim (or --finetune)")
    try:
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False,
                                              load_module_only=module_only)
    except CheckpointLoadError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError, AttributeError) as e:
        first = first_line(e)
        hint = ("; a checkpoint without optimizer state (converted)? add --no-load-optim"
                if isinstance(e, AttributeError) and not module_only else "")
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {first}){hint}"
                              ) from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no model states")
    if tr.finetune:
        return ResumeState(0, 0, weights_loaded=True)
    if not tr.no_load_rng:
        rng_path = os.path.join(path, rng_file(layout.rank))
        if not os.path.isfile(rng_path):
            raise CheckpointError(f"{rng_path} is missing (use --no-load-rng to skip)")
        rng_codec.restore(safe_load(rng_path), getattr(engine.module, "tp_rng", None))
    return ResumeState(run_state["iteration"], run_state["consumed_train_samples"],
                       run_state.get("skipped_steps", 0), weights_loaded=True)
