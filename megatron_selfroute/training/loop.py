"""The training driver shared by pretrain_gpt.py and pretrain_vit.py.

A script supplies a `Task` (how to build the model, the datasets, and one forward step); this
module does distributed set-up, the DeepSpeed engine, checkpoint resume, the step loop with
gradient accumulation, evaluation, logging, checkpoints and clean exits (interval, wall time,
SIGTERM).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_selfroute.config import Config, ConfigError
from megatron_selfroute.data.samplers import PretrainingSampler, WithSampleIndex
from megatron_selfroute.moe.router import ROUTERS
from megatron_selfroute.parallel.engine import (
    CheckpointLoadError,
    build_engine,
    clip_gradients_stage0,
    gradient_accumulation_steps,
)
from megatron_selfroute.parallel.groups import all_reduce_small, shutdown
from megatron_selfroute.parallel.layout import ParallelLayout, init_distributed
from megatron_selfroute.training import checkpointing
from megatron_selfroute.training.faults import (
    TrainingError,
    any_rank_nonfinite,
    injected_fault,
    skip_or_stop,
    zero_loss,
)
from megatron_selfroute.training.logging import (
    MetricsLogger,
    RoutingAccumulator,
    Timer,
    Timers,
    format_eta,
    print_rank0,
)
from megatron_selfroute.training.schedules import learning_rate


@dataclass
class Task:
    """What a pretraining script provides."""

    # The single-device model; expert weights may stay on the meta device until `parallelize`.
    build_model: Callable[[Config], torch.nn.Module]
    # Applies the layout: keeps this rank's experts, wires the groups, initialises the weights.
    parallelize: Callable[[torch.nn.Module, ParallelLayout], torch.nn.Module]
    build_datasets: Callable[[Config, list[int]], tuple]
    forward_step: Callable[[Any, dict, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    collate: Callable[[list], dict]
    flops_per_sample: Callable[[Config], float]
    tokens_per_sample: Callable[[Config], int]
    # Name of the main loss among forward_step's metrics (the others are averaged and logged).
    loss_name: str = "lm loss"
    # (cfg, dataset, consumed_samples, total_samples, layout) -> iterable of batches; default:
    # the Megatron sequential order of data/samplers.py over the data-parallel ranks.
    make_train_loader: Optional[Callable[[Config, Any, int, int, ParallelLayout], Any]] = None
    # Called after every optimizer step with (engine, iteration), e.g. for a model EMA.
    after_step: Optional[Callable[[Any, int], None]] = None
    report_perplexity: bool = True
    # Called with (engine, batch) on each batch while it is still on the host, before the copy to
    # the device: a place for data checks that would otherwise wait for the GPU.
    check_batch: Optional[Callable[[Any, dict], None]] = None
    # Settings outside Config that fix the model's shape (e.g. image and patch size): saved with
    # every checkpoint and compared on resume.
    shape_config: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run did (returned to callers and tests)."""

    iteration: int
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> lm loss
    valid_losses: dict[int, float] = field(default_factory=dict)
    exit_reason: str = "done"


_SIGNAL = {"received": False}


def _on_sigterm(signum, frame) -> None:
    _SIGNAL["received"] = True


def peak_tflops(cfg: Config) -> Optional[float]:
    """--peak-tflops, else dense bf16 peak of a known GPU (None on CPU: MFU not reported)."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0)):
        if key in name:
            return peak if (cfg.train.bf16 or cfg.train.fp16) else peak / 2
    return None


def _check_writable(path: Optional[str], flag: str) -> None:
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not writable ({e.strerror})") from None


def _batches(dataset, cfg: Config, consumed: int, total: int, collate,
             layout: ParallelLayout) -> Any:
    sampler = PretrainingSampler(total, consumed, cfg.train.micro_batch_size, layout.dp_rank,
                                 layout.dp)
    # Its own generator: creating a loader must not draw from the global RNG (dropout), or a
    # resumed run would diverge from an uninterrupted one.
    gen = torch.Generator().manual_seed(cfg.train.seed)
    return torch.utils.data.DataLoader(WithSampleIndex(dataset), batch_sampler=sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=collate,
                                       generator=gen, pin_memory=torch.cuda.is_available())


def _to_device(task: Task, engine, batch: dict) -> dict:
    """The task's host-side checks on a loader batch, then its tensors on the engine's device."""
    if task.check_batch is not None:
        task.check_batch(engine, batch)
    return {k: (v.to(engine.device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def evaluate(engine, task: Task, dataset, cfg: Config, iteration: int,
             layout: ParallelLayout) -> tuple[dict, Any]:
    """Every forward_step metric averaged over --eval-iters micro-batches of `dataset` (from its
    start, on all ranks), and the routing statistics."""
    engine.eval()
    acc = RoutingAccumulator()
    sums: dict[str, float] = {}
    n = 0
    per_step = cfg.train.micro_batch_size * layout.dp
    needed = cfg.train.eval_iters * per_step
    needed -= needed % per_step
    loader = _batches(dataset, cfg, 0, min(needed, len(dataset)), task.collate, layout)
    with torch.no_grad():
        for batch in loader:
            _, metrics = task.forward_step(engine, _to_device(task, engine, batch), iteration)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            model = engine.module
            if getattr(model, "moe_layers", None):
                acc.add(*model.routing_counts())
    engine.train()
    names = sorted(sums)
    stats = all_reduce_small(torch.tensor([sums[k] for k in names] + [n], dtype=torch.float64),
                             group=layout.dp_group)
    count = max(stats[-1].item(), 1)
    return ({k: stats[i].item() / count for i, k in enumerate(names)},
            acc.reduce_and_reset(layout.dp_group))


def pretrain(cfg: Config, task: Task, layout: Optional[ParallelLayout] = None,
             extra_ds: Optional[dict] = None) -> RunResult:
    """Train per `cfg` on `layout` (default: the launcher's world); returns the per-iteration
    losses. Every rank calls it."""
    init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
    layout = (layout or ParallelLayout.from_config(cfg)).build_groups()
    layout.validate(cfg)
    rank = layout.rank
    tr = cfg.train
    if tr.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use "
                          "--bf16")
    if tr.global_batch_size is None:
        tr.global_batch_size = tr.micro_batch_size * layout.dp
    accum = gradient_accumulation_steps(cfg, layout.dp)
    if tr.train_iters is None:
        if tr.train_samples is None:
            raise ConfigError("one of --train-iters or --train-samples is required")
        tr.train_iters = math.ceil(tr.train_samples / tr.global_batch_size)
    if rank == 0:
        _check_writable(tr.save, "--save")
        _check_writable(tr.tensorboard_dir, "--tensorboard-dir")
    dist.barrier()
    torch.manual_seed(tr.seed)
    if tr.deterministic:  # bit-exact resume on GPU (cuBLAS needs a fixed workspace)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    model = task.parallelize(task.build_model(cfg), layout)
    print_rank0(f"> parallel layout: {layout}")
    pattern = getattr(model, "pattern", None)
    if pattern is not None and any(pattern):
        router = ROUTERS[cfg.moe.router_type]
        router_params = sum(pattern) * router.learned_parameters(cfg.model.hidden_size,
                                                                 cfg.moe.num_experts)
        print_rank0(f"> MoE layers at blocks {[i for i, v in enumerate(pattern) if v]} "
                    f"({cfg.moe.num_experts or 0} experts, top-{cfg.moe.moe_router_topk}, "
                    f"router {cfg.moe.router_type} with {router_params} learned parameters, "
                    f"EP={layout.ep}, dispatcher {cfg.moe.moe_token_dispatcher_type})")
    engine = build_engine(model, cfg, layout, extra_ds)
    state = checkpointing.ResumeState()
    if tr.load:
        loaded = checkpointing.load_checkpoint(engine, tr.load, cfg, layout, task.shape_config)
        if loaded is None:
            print_rank0(f"> no checkpoint in --load {tr.load}; starting from scratch")
        else:
            state = loaded
            if state.consumed_train_samples > state.iteration * tr.global_batch_size:
                raise checkpointing.CheckpointError(
                    f"{tr.load} consumed {state.consumed_train_samples} samples in "
                    f"{state.iteration} iterations; --global-batch-size "
                    f"{tr.global_batch_size} does not match (use the checkpoint's global batch, "
                    "or --finetune)")
            print_rank0(f"> resumed from {tr.load} at iteration {state.iteration}")
    gbs = tr.global_batch_size
    n_eval = (tr.train_iters // tr.eval_interval + 1) * tr.eval_iters * gbs
    train_ds, valid_ds, _ = task.build_datasets(cfg, [tr.train_iters * gbs, n_eval,
                                                      tr.eval_iters * gbs])
    if train_ds is None:
        raise ConfigError(f"--split {cfg.data.split} leaves no training data in --data-path "
                          f"{' '.join(cfg.data.data_path)}")
    make_loader = task.make_train_loader or (
        lambda c, ds, consumed, total, lay: _batches(ds, c, consumed, total, task.collate, lay))
    loader = iter(make_loader(cfg, train_ds, state.consumed_train_samples, tr.train_iters * gbs,
                              layout))
    logger = MetricsLogger(tr.tensorboard_dir, cfg.to_dict(), tr.wandb_project)
    if tr.exit_signal_handler:
        signal.signal(signal.SIGTERM, _on_sigterm)
    result = RunResult(state.iteration)
    routing = RoutingAccumulator()
    step_timer = Timer()
    timers = Timers(tr.timing_log_level)
    interval = {"lm": 0.0, "aux": 0.0, "n": 0}
    start_time = time.time()
    flops_per_iter = task.flops_per_sample(cfg) * gbs
    tokens_per_iter = task.tokens_per_sample(cfg) * gbs
    peak = peak_tflops(cfg)
    last_saved: Optional[str] = None
    iters_this_run = 0
    profiler = _maybe_profiler(cfg)
    while state.iteration < tr.train_iters:
        it = state.iteration
        lr = learning_rate(tr, it, tr.train_iters)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        step_timer.start()
        lm_sum, aux_sum = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        own_norm = None
        skip_step = False
        for micro in range(accum):
            with timers("data", 1):
                batch = _to_device(task, engine, next(loader))
            with timers("forward", 1):
                loss, metrics = task.forward_step(engine, batch, it)
            loss = injected_fault(loss, it + 1)
            with timers("nan-check", 2):
                nonfinite = any_rank_nonfinite(loss)
            if nonfinite:
                skip_step = skip_step or skip_or_stop(state, tr, it + 1, "loss",
                                                       last_saved or tr.load)
                engine.backward(zero_loss(engine.module))  # keeps every rank's collectives
            else:
                lm_sum += metrics[task.loss_name].double().cpu()
                aux_sum += metrics["aux loss"].double().cpu()
                with timers("backward", 1):
                    engine.backward(loss)
            if getattr(engine.module, "moe_layers", None):
                routing.add(*engine.module.routing_counts())
            if micro == accum - 1 and engine.own_clipping and not skip_step:
                with timers("grad-clip", 2):
                    own_norm = clip_gradients_stage0(engine.module, tr.clip_grad, layout)
                if not math.isfinite(own_norm):
                    skip_step = skip_or_stop(state, tr, it + 1, "gradient norm",
                                              last_saved or tr.load)
            if micro == accum - 1 and skip_step:
                for group in engine.optimizer.param_groups:  # no weight update this step
                    group["lr"] = 0.0
            with timers("optimizer" if micro == accum - 1 else "step-bookkeeping", 1):
                engine.step()
        if not skip_step and not engine.own_clipping:
            norm = engine.get_global_grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                raise TrainingError(f"non-finite gradient norm at iteration {it + 1}; last good "
                                    f"checkpoint: {last_saved or tr.load or 'none'}")
        step_timer.stop()
        if task.after_step is not None:
            task.after_step(engine, it + 1)
        state.iteration += 1
        state.consumed_train_samples += gbs
        iters_this_run += 1
        lm_loss, aux_loss = _dp_mean(torch.stack([lm_sum, aux_sum]) / accum, layout)
        result.iteration = state.iteration
        if skip_step:
            result.losses[state.iteration] = float("nan")
        else:
            result.losses[state.iteration] = lm_loss
            interval["lm"] += lm_loss
            interval["aux"] += aux_loss
            interval["n"] += 1
        if profiler is not None:
            profiler.step()
        if state.iteration % tr.log_interval == 0 or state.iteration == tr.train_iters:
            elapsed = step_timer.pop()
            n_logged = max(interval["n"], 1)
            per_iter = elapsed / n_logged
            grad_norm = own_norm if engine.own_clipping else engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            tflops = flops_per_iter / per_iter / 1e12 / layout.world_size
            metrics_out = {task.loss_name: interval["lm"] / n_logged,
                           "aux loss": interval["aux"] / n_logged, "learning-rate": lr,
                           "skipped-steps": float(state.skipped_steps),
                           "grad-norm": grad_norm, "tokens-per-sec": tokens_per_iter / per_iter,
                           "tflops-per-device": tflops,
                           "consumed-samples": float(state.consumed_train_samples)}
            if peak:
                metrics_out["mfu"] = tflops / peak
            logger.scalars("train", metrics_out, state.iteration)
            rstats = routing.reduce_and_reset(layout.dp_group)
            logger.routing("train", rstats, state.iteration)
            eta = per_iter * (tr.train_iters - state.iteration)
            line = (f" iteration {state.iteration:8d}/{tr.train_iters:8d} | consumed samples "
                    f"{state.consumed_train_samples:10d} | elapsed time per iteration (ms): "
                    f"{per_iter * 1000:.1f} | learning rate {lr:.3E} | global batch size "
                    f"{gbs:5d} | {task.loss_name} {metrics_out[task.loss_name]:.6E} | aux loss "
                    f"{metrics_out['aux loss']:.4E} | grad norm {grad_norm:.3f} | tokens/s "
                    f"{metrics_out['tokens-per-sec']:.0f} | TFLOP/s/device {tflops:.3f}")
            if peak:
                line += f" | MFU {100 * tflops / peak:.1f}%"
            if rstats is not None:
                h = sum(rstats["normalized_entropy"]) / len(rstats["normalized_entropy"])
                mf = sum(rstats["max_fraction"]) / len(rstats["max_fraction"])
                line += f" | routing H/logN {h:.3f} max-frac {mf:.3f}"
            if state.skipped_steps:
                line += f" | skipped steps {state.skipped_steps}"
            print_rank0(line + f" | ETA {format_eta(eta)}")
            timing = timers.pop_ms(n_logged)
            if timing:
                logger.scalars("timers", timing, state.iteration)
                print_rank0("    timers (ms per iteration): " + " | ".join(
                    f"{k} {v:.1f}" for k, v in timing.items()))
            interval = {"lm": 0.0, "aux": 0.0, "n": 0}
        if valid_ds is not None and state.iteration % tr.eval_interval == 0:
            _run_eval(engine, task, valid_ds, cfg, state.iteration, logger, result, layout)
        reason = _exit_reason(cfg, state.iteration, start_time)
        saving = tr.save and (reason or (tr.save_interval and
                                         state.iteration % tr.save_interval == 0))
        if saving:
            last_saved = checkpointing.save_checkpoint(engine, tr.save, cfg, state, layout,
                                                       task.shape_config)
            print_rank0(f"> saved checkpoint {last_saved}")
        if reason:
            print_rank0(f"> exiting at iteration {state.iteration}: {reason}")
            result.exit_reason = reason
            break
    else:
        if valid_ds is not None and state.iteration % tr.eval_interval != 0 and iters_this_run:
            _run_eval(engine, task, valid_ds, cfg, state.iteration, logger, result, layout)
        final_tag = checkpointing.tag_for(state.iteration)
        if tr.save and iters_this_run and not (last_saved or "").endswith(final_tag):
            last_saved = checkpointing.save_checkpoint(engine, tr.save, cfg, state, layout,
                                                       task.shape_config)
            print_rank0(f"> saved checkpoint {last_saved}")
    if profiler is not None:
        profiler.stop()
    logger.close()
    return result


def _run_eval(engine, task, valid_ds, cfg, iteration, logger, result, layout) -> None:
    metrics, rstats = evaluate(engine, task, valid_ds, cfg, iteration, layout)
    loss = metrics[task.loss_name]
    result.valid_losses[iteration] = loss
    if task.report_perplexity:
        metrics[f"{task.loss_name} ppl"] = math.exp(min(loss, 50))
    logger.scalars("valid", metrics, iteration)
    logger.routing("valid", rstats, iteration)
    parts = " | ".join(f"{k} {v:.6E}" if k == task.loss_name else f"{k} {v:.4f}"
                       for k, v in metrics.items())
    line = f" validation at iteration {iteration} | {parts}"
    if rstats is not None:
        ent = " ".join(f"{v:.3f}" for v in rstats["normalized_entropy"])
        mf = " ".join(f"{v:.3f}" for v in rstats["max_fraction"])
        line += f"\n   per-layer H/logN: {ent}\n   per-layer max expert fraction: {mf}"
    print_rank0(line)


def _dp_mean(values: torch.Tensor, layout: ParallelLayout) -> list[float]:
    return (all_reduce_small(values, group=layout.dp_group) / layout.dp).tolist()


def _exit_reason(cfg: Config, iteration: int, start_time: float) -> Optional[str]:
    tr = cfg.train
    flags = torch.tensor([
        1.0 if _SIGNAL["received"] else 0.0,
        1.0 if (tr.exit_duration_in_mins and
                (time.time() - start_time) / 60 >= tr.exit_duration_in_mins) else 0.0,
    ])
    flags = all_reduce_small(flags, op=dist.ReduceOp.MAX)
    if flags[0] > 0:
        return "SIGTERM received (--exit-signal-handler)"
    if flags[1] > 0:
        return f"--exit-duration-in-mins {tr.exit_duration_in_mins} reached"
    if tr.exit_interval and iteration % tr.exit_interval == 0:
        return f"--exit-interval {tr.exit_interval}"
    return None


def _maybe_profiler(cfg: Config):
    tr = cfg.train
    if not tr.profile:
        return None
    out = tr.tensorboard_dir or tr.save or "."
    prof = torch.profiler.profile(
        schedule=torch.profiler.schedule(wait=max(tr.profile_step_start - 1, 0), warmup=1,
                                         active=tr.profile_step_end - tr.profile_step_start + 1,
                                         repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(out))
    prof.start()
    return prof


def _is_comm_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        k in text for k in ("gloo", "nccl", "timed out", "connection closed", "connection reset",
                            "broken pipe"))


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Entry-point wrapper: one-line errors (no traceback unless --debug), clean shutdown.

    A failed collective (a peer rank died, or stalled past --distributed-timeout-minutes) ends
    this rank at once with exit code 3, so no rank hangs on a dead job.
    """
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        main(argv)
        shutdown()
    except (ConfigError, checkpointing.CheckpointError, TrainingError, ValueError,
            FileNotFoundError, CheckpointLoadError) as e:
        if debug:
            raise
        rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        print(f"error: {rank}{e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except Exception as e:
        if not _is_comm_failure(e):
            raise
        if debug:
            traceback.print_exc()
        rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {rank}collective communication failed: {first} (a peer rank died or "
              "stalled past --distributed-timeout-minutes)", file=sys.stderr, flush=True)
        os._exit(3)
