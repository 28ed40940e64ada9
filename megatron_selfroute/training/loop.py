"""The training driver shared by pretrain_gpt.py and pretrain_vit.py, in named steps.

A script supplies a `Task` (`training/task.py`: how to build and parallelise the model, the
datasets and one forward step) and a `ParallelLayout`; `pretrain` then runs

    Trainer.setup      distributed groups, the resolved config, model, engine, resume, data
    Trainer.train_step one optimizer step over the gradient-accumulation micro-batches
                       (NaN skip, exact ZeRO-0 clipping)
    Trainer.record     the step's losses into the run result and the interval sums
    Trainer.log        the Megatron-style line, TensorBoard scalars, routing statistics, timers
    Trainer.evaluate_save_exit   validation, checkpoints, clean exits (interval, wall time,
                       SIGTERM)

until --train-iters, then `finish` (the final validation and checkpoint) and, always, `close`.
No module-level state: the SIGTERM latch and the fault injection hook belong to the run and are
made once in `setup`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_selfroute.arguments import validate
from megatron_selfroute.cli import first_line
from megatron_selfroute.config import Config, ConfigError
from megatron_selfroute.data.packed import PackedCollate, Unpacked
from megatron_selfroute.data.samplers import PretrainingSampler, WithSampleIndex
from megatron_selfroute.models.common import routing_counts
from megatron_selfroute.moe.balancing import ExpertBiasUpdater
from megatron_selfroute.moe.cross_layer import cross_layer_live
from megatron_selfroute.moe.router import ROUTERS
from megatron_selfroute.parallel.engine import (
    build_engine,
    clip_gradients_stage0,
    gradient_accumulation_steps,
    update_skipped,
)
from megatron_selfroute.parallel.groups import all_reduce_small
from megatron_selfroute.parallel.layout import ParallelLayout, init_distributed
from megatron_selfroute.training import checkpointing
from megatron_selfroute.training.entry import run_main  # noqa: F401  (re-exported for scripts)
from megatron_selfroute.training.faults import (
    LOADER_DIED,
    ExitSignal,
    FaultHook,
    TrainingError,
    die_now,
    kill_injection_from_env,
    nan_injection_from_env,
    skip_or_stop,
)
from megatron_selfroute.training.lease import SaveLease
from megatron_selfroute.training.logging import (
    MetricsLogger,
    RoutingAccumulator,
    Timer,
    Timers,
    format_eta,
    print_rank0,
)
from megatron_selfroute.training.schedules import learning_rate
from megatron_selfroute.training.summary import RunSummary
from megatron_selfroute.training.task import RunResult, Task

__all__ = ["RunResult", "Task", "Trainer", "evaluate", "pretrain", "resolve_config",
           "run_main"]


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


def resolve_config(cfg: Config, layout: ParallelLayout) -> Config:
    """The run's config, computed once: a copy with the global batch (default micro batch x
    data-parallel size) and the iteration count (from --train-samples) filled in."""
    cfg = Config.from_dict(cfg.to_dict())
    tr = cfg.train
    if tr.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use "
                          "--bf16")
    if tr.global_batch_size is None:
        tr.global_batch_size = tr.micro_batch_size * layout.dp
    if tr.train_iters is None:
        if tr.train_samples is None:
            raise ConfigError("one of --train-iters or --train-samples is required")
        tr.train_iters = math.ceil(tr.train_samples / tr.global_batch_size)
    if tr.eval_every_tokens is not None:
        per_step = tr.global_batch_size * cfg.model.seq_length
        if tr.eval_every_tokens % per_step:
            raise ConfigError(f"--eval-every-tokens {tr.eval_every_tokens} is not a multiple of "
                              f"the {per_step} tokens of a step (global batch "
                              f"{tr.global_batch_size} x sequence length {cfg.model.seq_length})")
        tr.eval_interval = tr.eval_every_tokens // per_step
    return cfg


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


def _check_save_is_ours(cfg: Config) -> None:
    """--save holding another run's checkpoints (no --load of it) would be overwritten."""
    tr = cfg.train
    if not tr.save or (tr.load and os.path.realpath(tr.load) == os.path.realpath(tr.save)):
        return
    try:
        tag = checkpointing.read_pointer(tr.save)
    except checkpointing.CheckpointError:
        tag = "an unreadable pointer"
    if tag is not None:
        raise ConfigError(f"--save {tr.save} already holds checkpoints of a run (its pointer "
                          f"names {tag}); resume it with --load {tr.save}, or choose a new --save "
                          "directory")


def _next_batch(loader, iteration: int):
    """The next batch; a loader whose worker died (killed, out of memory, a bus error reading
    the data) surfaces as a RuntimeError or a broken pipe: one line instead of a traceback."""
    try:
        return next(loader)
    except (StopIteration, ValueError):  # ValueError: data errors that already name the culprit
        raise
    except (RuntimeError, ConnectionError, EOFError) as e:
        if isinstance(e, RuntimeError) and not str(e).startswith("DataLoader worker"):
            raise  # another failure (e.g. a collate error): its own message and traceback
        first = first_line(e)
        raise TrainingError(f"the data loader failed at iteration {iteration}: {first} "
                            f"({LOADER_DIED})") from e


def _take_outputs(cfg: Config, layout: ParallelLayout) -> Optional[SaveLease]:
    """Rank 0 checks the output directories and takes the lease on --save; every rank gets the
    verdict (one line on every rank, before any model is built)."""
    tr = cfg.train
    lease, err = None, None
    if layout.rank == 0:
        try:
            _check_writable(tr.save, "--save")
            _check_writable(tr.tensorboard_dir, "--tensorboard-dir")
            if tr.run_summary:
                _check_writable(os.path.dirname(os.path.abspath(tr.run_summary)),
                                "--run-summary's directory")
                if os.path.isdir(tr.run_summary):
                    raise ConfigError(f"--run-summary {tr.run_summary} is a directory (give a "
                                      "file name)")
            if tr.save and tr.save_lease_timeout:
                lease = SaveLease(tr.save, tr.save_lease_timeout).acquire()
                if lease.took_over:
                    print_rank0(f"> took over the lease on --save {tr.save}: "
                                f"{lease.took_over}")
        except ConfigError as e:
            err = str(e)
        except OSError as e:
            err = f"--save {tr.save}: cannot take the lease ({e.strerror or e})"
        except Exception as e:  # noqa: BLE001 - every rank must reach the broadcast below
            err = f"--save {tr.save}: cannot take the lease ({type(e).__name__}: {e})"
    if layout.world_size > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        if lease is not None:
            lease.release()
        raise ConfigError(err)
    return lease


def batches(dataset, cfg: Config, consumed: int, total: int, collate,
            layout: ParallelLayout) -> Any:
    """Megatron's sequential order over the data-parallel ranks, from sample `consumed`."""
    sampler = PretrainingSampler(total, consumed, cfg.train.micro_batch_size, layout.dp_rank,
                                 layout.dp)
    # Its own generator: creating a loader must not draw from the global RNG (dropout), or a
    # resumed run would diverge from an uninterrupted one.
    gen = torch.Generator().manual_seed(cfg.train.seed)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        WithSampleIndex(dataset), batch_sampler=sampler, num_workers=workers,
        collate_fn=PackedCollate(collate) if workers else collate, generator=gen,
        pin_memory=torch.cuda.is_available())
    return Unpacked(loader) if workers else loader  # one shared-memory buffer per batch


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
    sums: dict[str, torch.Tensor] = {}  # float64 on the device: one host read at the end
    n = 0
    per_step = cfg.train.micro_batch_size * layout.dp
    needed = cfg.train.eval_iters * per_step
    needed -= needed % per_step
    loader = batches(dataset, cfg, 0, min(needed, len(dataset)), task.collate, layout)
    with torch.no_grad():
        for batch in loader:
            _, metrics = task.forward_step(engine, _to_device(task, engine, batch), iteration)
            for k, v in metrics.items():
                v = torch.as_tensor(v, device=engine.device).detach().double()
                sums[k] = sums[k] + v if k in sums else v
            n += 1
            model = engine.module
            if getattr(model, "moe_layers", None):
                acc.add(*model.routing_counts())
    engine.train()
    names = sorted(sums)
    local = torch.stack([sums[k] for k in names]
                        + [torch.tensor(float(n), dtype=torch.float64, device=engine.device)])
    stats = all_reduce_small(local, group=layout.dp_group).tolist()
    count = max(stats[-1], 1)
    return ({k: stats[i] / count for i, k in enumerate(names)},
            acc.reduce_and_reset(layout.dp_group))


@dataclass
class StepOutcome:
    """One optimizer step: data-parallel mean losses, the learning rate, whether it was skipped
    and the ZeRO-0 gradient norm this project computed (None when DeepSpeed clips)."""

    lm_loss: float
    aux_loss: float
    lr: float
    skipped: bool
    own_norm: Optional[float]


@dataclass
class _Interval:
    """Sums over the current logging interval."""

    lm: float = 0.0
    aux: float = 0.0
    n: int = 0


@dataclass
class Trainer:
    """Everything a run holds between its steps (made by `setup`)."""

    cfg: Config
    task: Task
    layout: ParallelLayout
    engine: Any
    state: checkpointing.ResumeState
    loader: Any
    valid_ds: Any
    logger: MetricsLogger
    exit_signal: ExitSignal
    fault_hook: FaultHook
    result: RunResult
    accum: int
    routing: RoutingAccumulator = field(default_factory=RoutingAccumulator)
    step_timer: Timer = field(default_factory=Timer)
    timers: Optional[Timers] = None
    interval: _Interval = field(default_factory=_Interval)
    start_time: float = field(default_factory=time.time)
    last_saved: Optional[str] = None
    iters_this_run: int = 0
    profiler: Any = None
    bias: Optional[ExpertBiasUpdater] = None
    summary: Optional[RunSummary] = None
    lease: Optional[SaveLease] = None
    kill_at: Optional[int] = None  # fault injection (MEGATRON_SELFROUTE_KILL_AT)
    # The model's MoE layers, found once (the model's property walks every module).
    moe_layers: list = field(default_factory=list)

    # ---- set-up ------------------------------------------------------------------------------

    @classmethod
    def setup(cls, cfg: Config, task: Task, layout: Optional[ParallelLayout] = None,
              extra_ds: Optional[dict] = None,
              fault_hook: Optional[FaultHook] = None) -> "Trainer":
        """Groups, the resolved config, the parallelised model on its engine, resume, data."""
        par = cfg.parallel
        init_distributed(par.distributed_backend, par.distributed_timeout_minutes)
        layout = layout or ParallelLayout.from_config(cfg, check=False)
        validate(cfg, None)  # every rule on the config the script finished, then the degrees
        layout.validate(cfg)
        layout.build_groups()
        cfg = resolve_config(cfg, layout)
        lease = _take_outputs(cfg, layout)
        try:
            return cls._setup(cfg, task, layout, extra_ds, fault_hook, lease)
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    @classmethod
    def _setup(cls, cfg: Config, task: Task, layout: ParallelLayout, extra_ds: Optional[dict],
               fault_hook: Optional[FaultHook], lease: Optional[SaveLease]) -> "Trainer":
        tr = cfg.train
        torch.manual_seed(tr.seed)
        if tr.deterministic:  # bit-exact resume on GPU (cuBLAS needs a fixed workspace)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
        model = task.parallelize(task.build_model(cfg), layout)
        if tr.compile:
            from megatron_selfroute.models.compile import compile_model

            n = compile_model(model, tr.compile_backend)
            print_rank0(f"> --compile: {n} modules compiled in place (backend "
                        f"{tr.compile_backend}; MoE layers stay eager)")
        summary = RunSummary(tr.run_summary, cfg, model) if tr.run_summary else None
        _log_model(cfg, layout, model)
        engine = build_engine(model, cfg, layout, extra_ds)
        state = _resume(engine, cfg, task, layout)
        gbs = tr.global_batch_size
        n_eval = (tr.train_iters // tr.eval_interval + 1) * tr.eval_iters * gbs
        train_ds, valid_ds, _ = task.build_datasets(cfg, [tr.train_iters * gbs, n_eval,
                                                          tr.eval_iters * gbs])
        if tr.eval_iters == 0:  # Megatron: --eval-iters 0 turns validation off
            valid_ds = None
        if train_ds is None:
            raise ConfigError(f"--split {cfg.data.split} leaves no training data in "
                              f"--data-path {' '.join(cfg.data.data_path)}")
        _check_save_is_ours(cfg)
        if task.init_from_data is not None and not state.weights_loaded:
            task.init_from_data(engine.module, train_ds)
        make_loader = task.make_train_loader or (
            lambda c, ds, consumed, total, lay: batches(ds, c, consumed, total, task.collate,
                                                        lay))
        loader = iter(make_loader(cfg, train_ds, state.consumed_train_samples,
                                  tr.train_iters * gbs, layout))
        logger = MetricsLogger(tr.tensorboard_dir, cfg.to_dict(), tr.wandb_project)
        return cls(cfg=cfg, task=task, layout=layout, engine=engine, state=state,
                   loader=loader, valid_ds=valid_ds, logger=logger,
                   exit_signal=ExitSignal(tr.exit_signal_handler),
                   fault_hook=fault_hook or nan_injection_from_env(layout.rank),
                   result=RunResult(state.iteration),
                   accum=gradient_accumulation_steps(cfg, layout.dp),
                   timers=Timers(tr.timing_log_level), profiler=_maybe_profiler(cfg),
                   bias=ExpertBiasUpdater(engine.module, cfg.moe.moe_router_bias_update_rate,
                                          layout.dp_group),
                   summary=summary, lease=lease,
                   kill_at=kill_injection_from_env(layout.rank),
                   moe_layers=list(getattr(engine.module, "moe_layers", None) or []))

    # ---- one optimizer step ------------------------------------------------------------------

    def train_step(self) -> StepOutcome:
        """Forward/backward over the micro-batches and one optimizer step (lr 0 when skipped)."""
        tr, engine, timers, state = self.cfg.train, self.engine, self.timers, self.state
        it = state.iteration
        if self.kill_at == it + 1:
            die_now()
        lr = learning_rate(tr, it, tr.train_iters)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        self.step_timer.start()
        # The step's sums on the device: lm loss, aux loss, micro-batches with a non-finite loss.
        acc = torch.zeros(3, dtype=torch.float64, device=engine.device)
        own_norm, skip = None, False
        last_good = self.last_saved or tr.load
        for micro in range(self.accum):
            last = micro == self.accum - 1
            with timers("data", 1):
                raw = _next_batch(self.loader, it + 1)
                if self.summary is not None:
                    self.summary.note_batch(it + 1, raw.get("tokens", raw.get("sample_index")))
                batch = _to_device(self.task, engine, raw)
            self.micro_batch(batch, it, acc)
            if not last:
                with timers("step-bookkeeping", 1):
                    engine.step()
                continue
            # The step's one loss read (Megatron checks its gradient norm once per step too):
            # every rank's sums in one all-reduce; the same verdict on every rank.
            with timers("nan-check", 2):
                totals = all_reduce_small(acc / self.accum)
                lm_loss, aux_loss, bad = (totals / self.layout.world_size).tolist()
            if bad > 0:
                skip = skip_or_stop(state, tr, it + 1, "loss", last_good)
            if engine.own_clipping and not skip:
                with timers("grad-clip", 2):
                    own_norm = clip_gradients_stage0(engine.module, tr.clip_grad, self.layout,
                                                     engine.grad_norm_groups, tr.grad_norm_fp64)
                if not math.isfinite(own_norm):
                    skip = skip_or_stop(state, tr, it + 1, "gradient norm", last_good)
            with timers("optimizer", 1), (update_skipped(engine) if skip
                                          else contextlib.nullcontext()):
                engine.step()
        if not skip and not engine.own_clipping:
            norm = engine.get_global_grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                raise TrainingError(f"non-finite gradient norm at iteration {it + 1}; last good "
                                    f"checkpoint: {last_good or 'none'}")
        if self.bias:
            self.bias.step(skip)  # after the optimizer step, never on a skipped one
        self.step_timer.stop()
        if self.task.after_step is not None:
            self.task.after_step(engine, it + 1)
        return StepOutcome(lm_loss, aux_loss, lr, skip, own_norm)

    def micro_batch(self, batch: dict, it: int, acc: torch.Tensor) -> None:
        """One micro-batch's forward and backward on a device batch, with no host read: its
        losses and whether its loss is finite are added to `acc` (lm, aux, non-finite count) on
        the device, and the routing counts stay there too (read at --log-interval)."""
        engine, timers = self.engine, self.timers
        with timers("forward", 1):
            loss, metrics = self.task.forward_step(engine, batch, it)
        loss = self.fault_hook(loss, it + 1)
        acc[0] += metrics[self.task.loss_name].detach().double()
        acc[1] += metrics["aux loss"].detach().double()
        acc[2] += (~torch.isfinite(loss.detach())).any()
        with timers("backward", 1):
            engine.backward(loss)  # a NaN here is discarded by the step (update_skipped)
        if self.moe_layers:
            counts, dropped = routing_counts(self.moe_layers)
            self.routing.add(counts, dropped)
            if self.bias:
                self.bias.add(counts)

    def record(self, step: StepOutcome) -> None:
        """Advance the position and keep the step's losses (NaN for a skipped step)."""
        state = self.state
        state.iteration += 1
        state.consumed_train_samples += self.cfg.train.global_batch_size
        self.iters_this_run += 1
        self.result.iteration = state.iteration
        if step.skipped:
            self.result.losses[state.iteration] = float("nan")
        else:
            self.result.losses[state.iteration] = step.lm_loss
            self.interval.lm += step.lm_loss
            self.interval.aux += step.aux_loss
            self.interval.n += 1
        if self.profiler is not None:
            self.profiler.step()

    # ---- logging -----------------------------------------------------------------------------

    def log(self, step: StepOutcome) -> None:
        """At every --log-interval and the last step: the console line, scalars, timers."""
        tr, state, name = self.cfg.train, self.state, self.task.loss_name
        if state.iteration % tr.log_interval and state.iteration != tr.train_iters:
            return
        gbs = tr.global_batch_size
        n_logged = max(self.interval.n, 1)
        per_iter = self.step_timer.pop() / n_logged
        grad_norm = step.own_norm if self.engine.own_clipping else (
            self.engine.get_global_grad_norm())
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.result.grad_norms[state.iteration] = grad_norm
        tflops = self.task.flops_per_sample(self.cfg) * gbs / per_iter / 1e12
        tflops /= self.layout.world_size
        tokens = self.task.tokens_per_sample(self.cfg) * gbs / per_iter
        if self.summary is not None:
            self.summary.note_log(tokens, per_iter * 1000)
        out = {name: self.interval.lm / n_logged, "aux loss": self.interval.aux / n_logged,
               "learning-rate": step.lr, "skipped-steps": float(state.skipped_steps),
               "grad-norm": grad_norm, "tokens-per-sec": tokens, "tflops-per-device": tflops,
               "consumed-samples": float(state.consumed_train_samples)}
        peak = peak_tflops(self.cfg)
        if peak:
            out["mfu"] = tflops / peak
        self.logger.scalars("train", out, state.iteration)
        rstats = self.routing.reduce_and_reset(self.layout.dp_group)
        self.logger.routing("train", rstats, state.iteration)
        if self.bias:
            self.logger.scalars("train-routing", self.bias.stats(), state.iteration)
        if self.moe_layers:
            self.logger.scalars("train-routing", cross_layer_live(self.engine.module),
                                state.iteration)
        line = (f" iteration {state.iteration:8d}/{tr.train_iters:8d} | consumed samples "
                f"{state.consumed_train_samples:10d} | elapsed time per iteration (ms): "
                f"{per_iter * 1000:.1f} | learning rate {step.lr:.3E} | global batch size "
                f"{gbs:5d} | {name} {out[name]:.6E} | aux loss {out['aux loss']:.4E} | grad "
                f"norm {grad_norm:.3f} | tokens/s {tokens:.0f} | TFLOP/s/device {tflops:.3f}")
        if peak:
            line += f" | MFU {100 * tflops / peak:.1f}%"
        if rstats is not None:
            h = sum(rstats["normalized_entropy"]) / len(rstats["normalized_entropy"])
            mf = sum(rstats["max_fraction"]) / len(rstats["max_fraction"])
            line += f" | routing H/logN {h:.3f} max-frac {mf:.3f}"
        if state.skipped_steps:
            line += f" | skipped steps {state.skipped_steps}"
        eta = per_iter * (tr.train_iters - state.iteration)
        print_rank0(line + f" | ETA {format_eta(eta)}")
        timing = self.timers.pop_ms(n_logged)
        if timing:
            self.logger.scalars("timers", timing, state.iteration)
            print_rank0("    timers (ms per iteration): " + " | ".join(
                f"{k} {v:.1f}" for k, v in timing.items()))
        self.interval = _Interval()

    # ---- evaluation, checkpoints, exits ------------------------------------------------------

    def evaluate_save_exit(self) -> Optional[str]:
        """Validation at --eval-interval, a checkpoint at --save-interval or before an exit;
        returns the exit reason (interval, wall time, SIGTERM) or None to go on."""
        tr, it = self.cfg.train, self.state.iteration
        if self.valid_ds is not None and it % tr.eval_interval == 0:
            self.run_eval()
        reason = self._exit_reason()
        if tr.save and (reason or (tr.save_interval and it % tr.save_interval == 0)):
            self.save()
        if reason:
            print_rank0(f"> exiting at iteration {it}: {reason}")
            self.result.exit_reason = reason
        return reason

    def run_eval(self) -> None:
        """Validate now; log the metrics, perplexity and per-layer routing."""
        it, name = self.state.iteration, self.task.loss_name
        metrics, rstats = evaluate(self.engine, self.task, self.valid_ds, self.cfg, it,
                                   self.layout)
        loss = metrics[name]
        self.result.valid_losses[it] = loss
        if self.summary is not None:
            self.summary.note_eval(it, loss, rstats, metrics)
        if self.task.report_perplexity:
            metrics[f"{name} ppl"] = math.exp(min(loss, 50))
        self.logger.scalars("valid", metrics, it)
        self.logger.routing("valid", rstats, it)
        parts = " | ".join(f"{k} {v:.6E}" if k == name else f"{k} {v:.4f}"
                           for k, v in metrics.items())
        line = f" validation at iteration {it} | {parts}"
        if rstats is not None:
            ent = " ".join(f"{v:.3f}" for v in rstats["normalized_entropy"])
            mf = " ".join(f"{v:.3f}" for v in rstats["max_fraction"])
            line += f"\n   per-layer H/logN: {ent}\n   per-layer max expert fraction: {mf}"
        print_rank0(line)

    def save(self) -> None:
        """Save a checkpoint; a failed save (any rank) stops the run, or under
        --continue-on-save-failure is logged and counted, the previous checkpoint intact."""
        tr = self.cfg.train
        try:
            self.last_saved = checkpointing.save_checkpoint(
                self.engine, tr.save, self.cfg, self.state, self.layout, self.task.shape_config,
                self.task.family, lease=self.lease)
        except checkpointing.LeaseLostError:
            raise
        except checkpointing.CheckpointSaveError as e:
            if not tr.continue_on_save_failure:
                raise checkpointing.CheckpointSaveError(
                    f"{e} (--continue-on-save-failure keeps training)") from None
            self.result.missed_saves.append(self.state.iteration)
            print_rank0(f"> WARNING: {e}; training goes on (--continue-on-save-failure, "
                        f"{len(self.result.missed_saves)} missed saves)")
            self.logger.scalars("train", {"missed-saves": float(len(self.result.missed_saves))},
                                self.state.iteration)
            return
        print_rank0(f"> saved checkpoint {self.last_saved}")

    def _exit_reason(self) -> Optional[str]:
        tr = self.cfg.train
        # The signal and wall-time verdicts must agree on every rank: one all-reduce per step,
        # only when either exit is asked for (as Megatron's loop does).
        if tr.exit_signal_handler or tr.exit_duration_in_mins:
            flags = torch.tensor([
                1.0 if self.exit_signal.received else 0.0,
                1.0 if (tr.exit_duration_in_mins and (time.time() - self.start_time) / 60
                        >= tr.exit_duration_in_mins) else 0.0,
            ])
            signal_seen, time_up = all_reduce_small(flags, op=dist.ReduceOp.MAX).tolist()
            if signal_seen > 0:
                return "SIGTERM received (--exit-signal-handler)"
            if time_up > 0:
                return f"--exit-duration-in-mins {tr.exit_duration_in_mins} reached"
        if tr.exit_interval and self.state.iteration % tr.exit_interval == 0:
            return f"--exit-interval {tr.exit_interval}"
        return None

    def finish(self) -> None:
        """After the last step of a completed run: the final validation and checkpoint, unless
        they were just done."""
        tr = self.cfg.train
        if self.iters_this_run:
            if self.valid_ds is not None and self.state.iteration % tr.eval_interval != 0:
                self.run_eval()
            final_tag = checkpointing.tag_for(self.state.iteration)
            if tr.save and not (self.last_saved or "").endswith(final_tag):
                self.save()

    def run(self) -> RunResult:
        """Train to --train-iters (or an exit), then close; returns what the run did."""
        try:
            while self.state.iteration < self.cfg.train.train_iters:
                step = self.train_step()
                self.record(step)
                self.log(step)
                if self.evaluate_save_exit():
                    break
            else:
                self.finish()
            if self.summary is not None:
                moe = self.cfg.moe
                self.summary.write(self.state.iteration, self.result.losses,
                                   self.state.iteration >= self.cfg.train.train_iters,
                                   moe.router_type if moe.is_moe else "dense",
                                   self.task.tokens_per_sample(self.cfg))
        finally:
            self.close()
        return self.result

    def close(self) -> None:
        """Stop the profiler, close the logger, restore the SIGTERM handler (also after an
        error)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        self.logger.close()
        self.exit_signal.close()
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def pretrain(cfg: Config, task: Task, layout: Optional[ParallelLayout] = None,
             extra_ds: Optional[dict] = None,
             fault_hook: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
             ) -> RunResult:
    """Train per `cfg` on `layout` (default: the launcher's world); returns the per-iteration
    losses. Every rank calls it. `fault_hook(loss, iteration)` may replace a loss (tests);
    by default it is MEGATRON_SELFROUTE_NAN_AT's, read once here."""
    return Trainer.setup(cfg, task, layout, extra_ds, fault_hook).run()


def _log_model(cfg: Config, layout: ParallelLayout, model: torch.nn.Module) -> None:
    print_rank0(f"> parallel layout: {layout}")
    plan = getattr(model, "recompute", None)
    if plan is not None and plan.granularity is not None:
        note = (" (--recompute-activations is Megatron's selective recompute; it recomputed "
                "whole blocks before: use --recompute-granularity full for that)"
                if cfg.model.recompute_activations else "")
        print_rank0(f"> activation recompute: {plan.describe()}{note}")
    pattern = getattr(model, "pattern", None)
    if pattern is not None and any(pattern):
        router = ROUTERS[cfg.moe.router_type]
        router_params = sum(pattern) * router.learned_parameters(cfg.model.hidden_size,
                                                                 cfg.moe.num_experts)
        print_rank0(f"> MoE layers at blocks {[i for i, v in enumerate(pattern) if v]} "
                    f"({cfg.moe.num_experts or 0} experts, top-{cfg.moe.moe_router_topk}, "
                    f"router {cfg.moe.router_type}, EP={layout.ep}, dispatcher "
                    f"{cfg.moe.moe_token_dispatcher_type}, {router_params} learned router "
                    "parameters)")


def _resume(engine, cfg: Config, task: Task, layout: ParallelLayout
            ) -> checkpointing.ResumeState:
    tr = cfg.train
    if not tr.load:
        return checkpointing.ResumeState()
    state = checkpointing.load_checkpoint(engine, tr.load, cfg, layout, task.shape_config)
    if state is None:
        print_rank0(f"> no checkpoint in --load {tr.load}; starting from scratch")
        return checkpointing.ResumeState()
    if state.consumed_train_samples > state.iteration * tr.global_batch_size:
        raise checkpointing.CheckpointError(
            f"{tr.load} consumed {state.consumed_train_samples} samples in {state.iteration} "
            f"iterations; --global-batch-size {tr.global_batch_size} does not match (use the "
            "checkpoint's global batch, or --finetune)")
    print_rank0(f"> resumed from {tr.load} at iteration {state.iteration}")
    return state


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
