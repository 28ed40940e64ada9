"""Megatron-style command-line flags generated from `config.py`, aliases, and validation.

Every dataclass field becomes `--kebab-case-name`. Megatron-DeepSpeed spellings are accepted as
aliases with their own meaning, translated once here:

- `--expert-interval N` -> `--moe-layer-freq` pattern with MoE in blocks N-1, 2N-1, ...
  (core's `--moe-layer-freq N` puts MoE in blocks 0, N, 2N, ...)
- `--topk K` -> `--moe-router-topk K` (Meg-DS defaults to 1; this project to 2)
- `--moe-loss-coeff C` -> `--moe-aux-loss-coeff C` (Meg-DS defaults to 0.1; this project to 0)
- `--moe-expert-parallel-size P` -> `--expert-model-parallel-size P`
- `--moe-train-capacity-factor F` -> `--moe-expert-capacity-factor F`
- `--disable-moe-token-dropping` -> capacity factor unset (dropless)
- `--moe-dispatcher T` -> `--moe-token-dispatcher-type T`
- `--deepspeed_config F` -> `--deepspeed-config F`; `--deepspeed` is accepted (always DeepSpeed)
- `--local_rank R` -> `--local-rank R`

Giving an alias and its core flag with different values is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Optional, Sequence

from megatron_selfroute.config import (
    EXTRA_SECTIONS,
    SECTIONS,
    Config,
    ConfigError,
    parse_layer_freq,
)
from megatron_selfroute.parallel.layout import (
    ParallelLayout,
    check_tensor_degree,
    launch_world_size,
)

__all__ = ["ConfigError", "build_parser", "namespace_to_config", "parse_args", "validate"]

_TYPES = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> tuple[Any, bool]:
    """(python type, is_bool) from a field's string annotation."""
    t = str(f.type).replace("Optional[", "").rstrip("]")
    if t == "bool":
        return bool, True
    if t == "list":
        return str, False
    return _TYPES[t], False


def add_section_arguments(parser: argparse.ArgumentParser, sec_name: str, sec_cls: type) -> None:
    """One flag per field of a config dataclass, dest "section.field" (given flags only)."""
    group = parser.add_argument_group(sec_name)
    for f in dataclasses.fields(sec_cls):
        meta = f.metadata
        typ, is_bool = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {default})"
        kw: dict[str, Any] = {"dest": f"{sec_name}.{f.name}", "default": argparse.SUPPRESS,
                              "help": help_text}
        if is_bool:
            action = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
            group.add_argument(_flag(f.name), action=action, **kw)
            continue
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if "nargs" in meta:
            kw["nargs"] = meta["nargs"]
        group.add_argument(_flag(f.name), type=typ, **kw)


def add_config_arguments(parser: argparse.ArgumentParser, sections: Sequence[str] = ()) -> None:
    """Add one flag per config field (all sections unless `sections` is given) plus aliases."""
    for sec_name, sec_cls in SECTIONS.items():
        if not sections or sec_name in sections:
            add_section_arguments(parser, sec_name, sec_cls)
    _add_aliases(parser)


def section_from_namespace(ns: argparse.Namespace, sec_name: str, sec_cls: type) -> Any:
    """The dataclass of one extra section: its defaults, then the flags given."""
    given = {k.split(".", 1)[1]: v for k, v in vars(ns).items() if k.startswith(sec_name + ".")}
    return sec_cls(**given)


def _add_aliases(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Megatron-DeepSpeed aliases")
    s = argparse.SUPPRESS
    g.add_argument("--expert-interval", type=int, dest="alias.expert_interval", default=s,
                   help="Meg-DS placement: MoE in blocks N-1, 2N-1, ...")
    g.add_argument("--topk", type=int, dest="alias.topk", default=s,
                   help="Alias of --moe-router-topk.")
    g.add_argument("--moe-loss-coeff", type=float, dest="alias.moe_loss_coeff", default=s,
                   help="Alias of --moe-aux-loss-coeff.")
    g.add_argument("--moe-expert-parallel-size", type=int, dest="alias.ep_size", default=s,
                   help="Alias of --expert-model-parallel-size.")
    g.add_argument("--moe-train-capacity-factor", type=float, dest="alias.capacity", default=s,
                   help="Alias of --moe-expert-capacity-factor.")
    g.add_argument("--disable-moe-token-dropping", action="store_true", default=s,
                   dest="alias.dropless", help="Dropless routing (capacity factor unset).")
    g.add_argument("--moe-dispatcher", dest="alias.dispatcher", default=s,
                   choices=["alltoall", "deepspeed"], help="Alias of --moe-token-dispatcher-type.")
    g.add_argument("--deepspeed_config", dest="alias.ds_config", default=s,
                   help="Alias of --deepspeed-config.")
    g.add_argument("--deepspeed", action="store_true", dest="alias.deepspeed", default=s,
                   help="Accepted for the DeepSpeed launcher; DeepSpeed is always the engine.")
    g.add_argument("--local_rank", type=int, dest="alias.local_rank", default=s,
                   help="Alias of --local-rank (set by the deepspeed launcher).")


# alias dest -> (section, field, core flag, alias flag)
_SIMPLE_ALIASES = {
    "topk": ("moe", "moe_router_topk", "--moe-router-topk", "--topk"),
    "moe_loss_coeff": ("moe", "moe_aux_loss_coeff", "--moe-aux-loss-coeff", "--moe-loss-coeff"),
    "ep_size": ("parallel", "expert_model_parallel_size", "--expert-model-parallel-size",
                "--moe-expert-parallel-size"),
    "capacity": ("moe", "moe_expert_capacity_factor", "--moe-expert-capacity-factor",
                 "--moe-train-capacity-factor"),
    "dispatcher": ("moe", "moe_token_dispatcher_type", "--moe-token-dispatcher-type",
                   "--moe-dispatcher"),
    "ds_config": ("parallel", "deepspeed_config", "--deepspeed-config", "--deepspeed_config"),
    "local_rank": ("parallel", "local_rank", "--local-rank", "--local_rank"),
}


def _set_once(given: dict, sec: str, name: str, value: Any, core: str, alias: str) -> None:
    key = (sec, name)
    if key in given and given[key] != value:
        raise ConfigError(f"{alias} {value} conflicts with {core} {given[key]}")
    given[key] = value


def namespace_to_config(ns: argparse.Namespace, base: Optional[Config] = None) -> Config:
    """Build a Config from parsed flags: defaults (or `base`), then given flags, then aliases."""
    given: dict[tuple[str, str], Any] = {}
    aliases: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        sec, name = key.split(".", 1)
        if sec == "alias":
            aliases[name] = value
        elif sec in SECTIONS:  # extra sections (EXTRA_SECTIONS) are not part of Config
            given[(sec, name)] = value
    for dest, (sec, name, core, alias) in _SIMPLE_ALIASES.items():
        if dest in aliases:
            _set_once(given, sec, name, aliases[dest], core, alias)
    if aliases.get("dropless"):
        if given.get(("moe", "moe_expert_capacity_factor")) is not None:
            raise ConfigError(
                "--disable-moe-token-dropping conflicts with a capacity factor "
                f"({given[('moe', 'moe_expert_capacity_factor')]})"
            )
        given[("moe", "moe_expert_capacity_factor")] = None
    if "expert_interval" in aliases:
        n = aliases["expert_interval"]
        if n < 1:
            raise ConfigError(f"--expert-interval {n} must be >= 1")
        layers = given.get(("model", "num_layers"), (base or Config()).model.num_layers)
        pattern = [1 if i % n == n - 1 else 0 for i in range(layers)]
        _set_once(given, "moe", "moe_layer_freq", str(pattern), "--moe-layer-freq",
                  "--expert-interval")
    cfg = dataclasses.replace(base) if base else Config()
    cfg = Config.from_dict(cfg.to_dict())  # deep copy
    for (sec, name), value in given.items():
        setattr(getattr(cfg, sec), name, value)
    return cfg


def build_parser(description: str = "", sections: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with every config flag (and aliases)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, sections)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "",
               extra: Optional[Any] = None, sections: Sequence[str] = ()
               ) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a validated Config, plus the namespace for script-specific extras; each
    extra section named in `sections` (config.EXTRA_SECTIONS) gets its generated flags and is
    returned as `ns.<section>`."""
    parser = build_parser(description)
    for name in sections:
        add_section_arguments(parser, name, EXTRA_SECTIONS[name])
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    for name in sections:
        setattr(ns, name, section_from_namespace(ns, name, EXTRA_SECTIONS[name]))
    cfg = namespace_to_config(ns)
    ns.explicit_flags = {k for k in vars(ns) if "." in k and not k.startswith("alias.")}
    ns.explicit_flags |= {f"{sec}.{name}" for dest, (sec, name, _, _) in _SIMPLE_ALIASES.items()
                          if f"alias.{dest}" in vars(ns)}
    validate(cfg, launch_world_size())
    return cfg, ns


def validate(cfg: Config, world_size: Optional[int] = 1) -> None:
    """Check every cross-field rule once, before heavy work; raise ConfigError naming the flags.

    `world_size` None skips the rules that depend on the process count (checked again by the
    run's `ParallelLayout`); otherwise the layout of `world_size` processes is validated too.
    """
    m, tr = cfg.model, cfg.train
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "ffn_hidden_size", "max_position_embeddings", "cross_entropy_chunk_size"):
        value = getattr(m, name)
        if value is not None and value < 1:  # 0 must not fall back to a default
            raise ConfigError(f"{_flag(name)} must be >= 1, got {value}")
    if m.hidden_size % m.num_attention_heads != 0:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} does not divide "
                          f"--hidden-size {m.hidden_size}")
    for name in ("layernorm_epsilon", "init_method_std"):
        value = getattr(m, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{_flag(name)} must be a finite number > 0, got {value}")
    if m.positions < m.seq_length:
        raise ConfigError(f"--max-position-embeddings {m.positions} < --seq-length {m.seq_length}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(m, name)}")
    if tr.bf16 and tr.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if tr.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {tr.micro_batch_size}")
    if tr.train_iters is not None and tr.train_samples is not None:
        raise ConfigError("--train-iters and --train-samples are mutually exclusive")
    _validate_numbers(cfg)
    if tr.compile:
        import torch._dynamo

        backends = set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"}
        if tr.compile_backend not in backends:
            raise ConfigError(f"--compile-backend {tr.compile_backend!r} is not a torch.compile "
                              f"backend (e.g. {', '.join(sorted(backends)[:6])})")
    from megatron_selfroute.models.recompute import resolve as resolve_recompute

    resolve_recompute(m)  # the recompute flags' contradictions, named
    d = cfg.data
    split_paths = [n for n in ("train_data_path", "valid_data_path", "test_data_path")
                   if getattr(d, n)]
    if split_paths and d.data_path:
        raise ConfigError(f"--data-path and {_flag(split_paths[0])} are mutually exclusive "
                          "(per-split paths use each file whole; --split does not apply)")
    if split_paths and not d.train_data_path:
        raise ConfigError(f"{_flag(split_paths[0])} needs --train-data-path")
    if split_paths and d.mock_data:
        raise ConfigError(f"--mock-data and {_flag(split_paths[0])} are mutually exclusive")
    if tr.eval_every_tokens is not None and tr.eval_every_tokens < 1:
        raise ConfigError(f"--eval-every-tokens must be >= 1, got {tr.eval_every_tokens}")
    _validate_moe(cfg)
    check_tensor_degree(cfg, cfg.parallel.tensor_model_parallel_size)
    if world_size is not None:
        ParallelLayout.from_config(cfg, world_size, rank=0)  # validates the degrees


def _validate_numbers(cfg: Config) -> None:
    """Ranges of the optimisation, schedule, logging and checkpoint numbers (NaN and inf are
    refused wherever a finite number is meant)."""
    tr, d = cfg.train, cfg.data
    # 0 keeps Megatron's meaning "off" for --eval-iters, --save-interval and --exit-interval
    at_least = {"train_iters": 1, "train_samples": 1, "log_interval": 1, "eval_interval": 1,
                "eval_iters": 0, "save_interval": 0, "keep_last": 1, "exit_interval": 0,
                "lr_warmup_iters": 0, "lr_decay_iters": 1, "skip_nan_steps": 0}
    for name, low in at_least.items():
        value = getattr(tr, name)
        if value is not None and value < low:
            raise ConfigError(f"{_flag(name)} must be >= {low}, got {value}")
    if d.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {d.num_workers}")
    if len(d.split.replace("/", ",").split(",")) > 3:
        raise ConfigError(f"--split {d.split}: at most three weights (train,valid,test)")
    finite_min = {"lr": 0.0, "min_lr": 0.0, "weight_decay": 0.0, "clip_grad": 0.0,
                  "save_lease_timeout": 0.0, "exit_duration_in_mins": 0.0}
    for name, low in finite_min.items():
        value = getattr(tr, name)
        if value is not None and not (math.isfinite(value) and value >= low):
            raise ConfigError(f"{_flag(name)} must be a finite number >= {low:g}, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(tr, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{_flag(name)} must be in [0, 1), got {value}")
    if not (math.isfinite(tr.adam_eps) and tr.adam_eps > 0):
        raise ConfigError(f"--adam-eps must be a finite number > 0, got {tr.adam_eps}")


def _validate_moe(cfg: Config) -> None:
    from megatron_selfroute.moe.router import ROUTERS, validate_router

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    if moe.router_type not in ROUTERS:
        raise ConfigError(f"--router-type {moe.router_type!r} is unknown; choose one of "
                          f"{', '.join(ROUTERS)}")
    shared = moe.moe_shared_expert_intermediate_size
    for name in ("num_experts", "moe_ffn_hidden_size"):
        value = getattr(moe, name)
        if value is not None and value < 1:  # 0 must not mean "dense" or "the default"
            omit = "a dense model" if name == "num_experts" else "the default"
            raise ConfigError(f"{_flag(name)} must be >= 1, got {value} (omit {_flag(name)} "
                              f"for {omit})")
    if not moe.is_moe:
        if par.expert_model_parallel_size != 1:
            raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
        if shared is not None:
            raise ConfigError("--moe-shared-expert-intermediate-size needs --num-experts")
        return
    if shared is not None and shared < 1:
        raise ConfigError(f"--moe-shared-expert-intermediate-size must be >= 1, got {shared}")
    n, k = moe.num_experts, moe.moe_router_topk
    if n < 1:
        raise ConfigError(f"--num-experts must be >= 1, got {n}")
    if not 1 <= k <= n:
        raise ConfigError(f"--moe-router-topk {k} must be between 1 and --num-experts {n}")
    try:
        pattern = parse_layer_freq(moe.moe_layer_freq, m.num_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    num_moe = sum(pattern)
    if num_moe == 0:
        raise ConfigError(f"--moe-layer-freq {moe.moe_layer_freq} places no MoE layer in "
                          f"{m.num_layers} blocks")
    validate_router(cfg, num_moe)
    if moe.moe_expert_capacity_factor is not None and moe.moe_expert_capacity_factor <= 0:
        raise ConfigError(f"--moe-expert-capacity-factor must be > 0, got "
                          f"{moe.moe_expert_capacity_factor}")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = getattr(moe, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{_flag(name)} must be a finite number >= 0, got {value}")
    ep = par.expert_model_parallel_size
    if ep < 1 or n % ep != 0:
        raise ConfigError(f"--num-experts {n} is not divisible by --expert-model-parallel-size "
                          f"{ep}")
    if par.zero_stage == 3:
        raise ConfigError("--zero-stage 3 is not supported with DeepSpeed-native MoE layers "
                          "(use --zero-stage 0, 1 or 2)")


def exit_on_config_error(err: Exception) -> None:
    """Print a one-line error and exit 2 (the CLI convention for bad flags)."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
