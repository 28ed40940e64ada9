"""The DeiT recipe of pretrain_vit.py: what the flags of `VisionConfig` (config.py) mean for the
shared config. A preset, DeiT's block details (exact GELU, LayerNorm eps 1e-6), MoE "every 2"
placement and DeiT's optimizer defaults apply to every field not given explicitly; epochs become
iterations; `--lr` is scaled by global batch / 512 unless `--no-lr-scale`."""
from __future__ import annotations

import argparse
import math

from megatron_selfroute.config import DEIT_EPOCHS, DEIT_PRESETS, Config, ConfigError, VisionConfig
from megatron_selfroute.models.vit import ViTConfig, apply_vit_defaults, every_second_block
from megatron_selfroute.moe.router import ROUTERS

# DeiT main.py defaults for shared flags (used unless the flag is given): field -> value.
DEIT_TRAIN = {"lr": 5e-4, "min_lr": 1e-5, "weight_decay": 0.05, "adam_beta2": 0.999,
              "clip_grad": 0.0, "micro_batch_size": 64}


def _given(ns: argparse.Namespace, sec: str, name: str) -> bool:
    return f"{sec}.{name}" in ns.explicit_flags


def resolve_model(cfg: Config, ns: argparse.Namespace) -> ViTConfig:
    """Preset, DeiT block details, MoE "every 2" placement and DeiT optimizer defaults, for
    every field not given explicitly; returns the image-specific config."""
    v: VisionConfig = ns.vision
    for name in ("img_size", "patch_size", "batch_size", "epochs"):
        value = getattr(v, name)
        if value is not None and value < 1:  # 0 must not fall back to the default
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (math.isfinite(v.warmup_epochs) and v.warmup_epochs >= 0):
        raise ConfigError(f"--warmup-epochs must be a finite number >= 0, got {v.warmup_epochs}")
    if cfg.model.cross_entropy_chunk_size is not None:
        raise ConfigError("--cross-entropy-chunk-size is for language models (a ViT's output "
                          "layer has as many rows as classes)")
    preset = DEIT_PRESETS[v.model] if v.model else {}
    vit = ViTConfig(img_size=v.img_size or preset.get("img_size", 224),
                    patch_size=v.patch_size or preset.get("patch_size", 16),
                    drop_path_rate=v.drop_path)
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if name in preset and not _given(ns, "model", name):
            setattr(cfg.model, name, preset[name])
    if vit.img_size % vit.patch_size:
        raise ConfigError(f"--patch-size {vit.patch_size} does not divide --img-size "
                          f"{vit.img_size}")
    if not 0.0 <= v.drop_path < 1.0:
        raise ConfigError(f"--drop-path must be in [0, 1), got {v.drop_path}")
    router = ROUTERS.get(cfg.moe.router_type)
    if cfg.moe.is_moe and router is not None and router.reads_token_ids:
        raise ConfigError(f"--router-type {cfg.moe.router_type} reads token ids; a ViT has none "
                          "(language models only)")
    eps, gelu = cfg.model.layernorm_epsilon, cfg.model.gelu_approximation
    apply_vit_defaults(cfg.model)
    if _given(ns, "model", "layernorm_epsilon"):
        cfg.model.layernorm_epsilon = eps
    if _given(ns, "model", "gelu_approximation"):
        cfg.model.gelu_approximation = gelu
    cfg.model.seq_length = vit.num_tokens
    cfg.model.max_position_embeddings = None
    placed = _given(ns, "moe", "moe_layer_freq") or "alias.expert_interval" in vars(ns)
    if cfg.moe.is_moe and not placed:
        cfg.moe.moe_layer_freq = every_second_block(cfg.model.num_layers)
    for name, value in DEIT_TRAIN.items():
        if not _given(ns, "train", name):
            setattr(cfg.train, name, value)
    if v.batch_size is not None:
        if _given(ns, "train", "micro_batch_size") and v.batch_size != cfg.train.micro_batch_size:
            raise ConfigError(f"--batch-size {v.batch_size} conflicts with --micro-batch-size "
                              f"{cfg.train.micro_batch_size}")
        cfg.train.micro_batch_size = v.batch_size
    if (v.mixup > 0 or v.cutmix > 0) and cfg.train.micro_batch_size % 2:
        raise ConfigError(f"--batch-size {cfg.train.micro_batch_size} must be even with --mixup/"
                          "--cutmix (timm Mixup pairs each image with its mirror in the batch)")
    return vit


def resolve_schedule(cfg: Config, ns: argparse.Namespace, num_train: int, num_val: int,
                     dp_size: int) -> dict:
    """Epochs -> iterations (train, warm-up, eval and save intervals, full-set evaluation) and
    the linear LR scaling over `dp_size` data-parallel ranks; returns the values for the log
    line."""
    v: VisionConfig = ns.vision
    tr = cfg.train
    gbs = tr.global_batch_size or tr.micro_batch_size * dp_size
    tr.global_batch_size = gbs
    per_epoch = num_train // gbs
    if per_epoch < 1:
        raise ConfigError(f"the {num_train} training images are fewer than the global batch "
                          f"{gbs} (--batch-size x processes)")
    by_iters = _given(ns, "train", "train_iters") or _given(ns, "train", "train_samples")
    if v.epochs is not None and by_iters:
        raise ConfigError("--epochs and --train-iters/--train-samples are mutually exclusive")
    epochs = v.epochs if v.epochs is not None else DEIT_EPOCHS
    if not by_iters:
        tr.train_iters = epochs * per_epoch
    if not _given(ns, "train", "lr_warmup_iters"):
        tr.lr_warmup_iters = round(v.warmup_epochs * per_epoch)
    if not _given(ns, "train", "eval_interval"):
        tr.eval_interval = per_epoch
    if not _given(ns, "train", "eval_iters"):
        tr.eval_iters = math.ceil(num_val / (tr.micro_batch_size * dp_size))
    if tr.save and not _given(ns, "train", "save_interval"):
        tr.save_interval = per_epoch
    base_lr = tr.lr
    if not v.no_lr_scale:
        tr.lr = base_lr * gbs / 512
    return {"per_epoch": per_epoch, "base_lr": base_lr, "gbs": gbs}
