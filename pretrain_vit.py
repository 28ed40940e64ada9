"""Pretrain a DeiT vision transformer on ImageNet-1K, dense or MoE (any router), on DeepSpeed.

Launch like pretrain_gpt.py (`python`, `torchrun`, `deepspeed`). The DeiT recipe flags keep DeiT's
names and meanings: `--batch-size` per process, `--lr` is the BASE rate scaled by global batch /
512 (unless `--no-lr-scale`), `--epochs`/`--warmup-epochs` become iterations (iterations per epoch
= train images // global batch), cosine decay over the run, AdamW with weight decay 0.05, betas
(0.9, 0.999), no gradient clipping, mixup/cutmix/label smoothing, RandAugment, random erasing,
repeated augmentation, stochastic depth, optional model EMA. Shared flags given explicitly always
win over these defaults. `--data-path` is an ImageFolder root (or use `--hf-dataset`).
Validation (every epoch by default, on the full validation set) reports cross-entropy `loss`,
`top1`/`top5` in percent, and with `--model-ema` the same for the EMA weights (`ema top1`...).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from timm.loss import SoftTargetCrossEntropy

from megatron_selfroute.arguments import ConfigError, parse_args
from megatron_selfroute.config import Config
from megatron_selfroute.data import vision
from megatron_selfroute.models.vit import (
    PRESETS,
    VisionTransformer,
    ViTConfig,
    apply_vit_defaults,
    describe,
    every_second_block,
    parallelize_vit,
    vit_flops_per_image,
)
from megatron_selfroute.parallel.layout import ParallelLayout
from megatron_selfroute.training.logging import print_rank0
from megatron_selfroute.training.loop import Task, pretrain, run_main

# DeiT main.py defaults for shared flags (used unless the flag is given): field -> value.
DEIT_TRAIN = {"lr": 5e-4, "min_lr": 1e-5, "weight_decay": 0.05, "adam_beta2": 0.999,
              "clip_grad": 0.0, "micro_batch_size": 64}
DEIT_EPOCHS = 300


def add_deit_flags(parser: argparse.ArgumentParser) -> None:
    """DeiT's recipe flags (names and defaults of DeiT main.py)."""
    g = parser.add_argument_group("DeiT recipe (ViT); --lr is the base LR for 512 images")
    g.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="DeiT preset (depth/width/heads/patch/img); explicit shape flags win.")
    g.add_argument("--img-size", type=int, default=None, help="Input resolution (224).")
    g.add_argument("--patch-size", type=int, default=None, help="Patch size (16).")
    g.add_argument("--num-classes", type=int, default=None,
                   help="Classes (default: from the dataset).")
    g.add_argument("--batch-size", type=int, default=None,
                   help="Images per process per micro-batch (= --micro-batch-size; DeiT 64).")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"Training epochs (DeiT {DEIT_EPOCHS}); excludes --train-iters.")
    g.add_argument("--warmup-epochs", type=float, default=5, help="Linear LR warm-up epochs.")
    g.add_argument("--no-lr-scale", action="store_true",
                   help="Use --lr as given instead of --lr x global batch / 512.")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0 = off).")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 = off).")
    g.add_argument("--smoothing", type=float, default=0.1, help="Label smoothing.")
    g.add_argument("--reprob", type=float, default=0.25, help="Random erasing probability.")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm AutoAugment policy or none.")
    g.add_argument("--drop-path", type=float, default=0.1, help="Stochastic depth rate.")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="Repeated augmentation (each image 3x per epoch on different GPUs).")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep an EMA of the weights (checkpointed) and evaluate it too.")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per step.")
    g.add_argument("--hf-dataset", default=None,
                   help="Hugging Face dataset (imagenet-1k, a save_to_disk dir, a local dataset) "
                        "instead of the ImageFolder --data-path.")


def _given(ns: argparse.Namespace, sec: str, name: str) -> bool:
    return f"{sec}.{name}" in ns.explicit_flags


def resolve_model(cfg: Config, ns: argparse.Namespace) -> ViTConfig:
    """Preset, DeiT block details, MoE "every 2" placement and DeiT optimizer defaults, for
    every field not given explicitly; returns the image-specific config."""
    preset = PRESETS[ns.model] if ns.model else {}
    vit = ViTConfig(img_size=ns.img_size or preset.get("img_size", 224),
                    patch_size=ns.patch_size or preset.get("patch_size", 16),
                    drop_path_rate=ns.drop_path)
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if name in preset and not _given(ns, "model", name):
            setattr(cfg.model, name, preset[name])
    if vit.img_size % vit.patch_size:
        raise ConfigError(f"--patch-size {vit.patch_size} does not divide --img-size "
                          f"{vit.img_size}")
    if not 0.0 <= ns.drop_path < 1.0:
        raise ConfigError(f"--drop-path must be in [0, 1), got {ns.drop_path}")
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
    if ns.batch_size is not None:
        if _given(ns, "train", "micro_batch_size") and ns.batch_size != cfg.train.micro_batch_size:
            raise ConfigError(f"--batch-size {ns.batch_size} conflicts with --micro-batch-size "
                              f"{cfg.train.micro_batch_size}")
        cfg.train.micro_batch_size = ns.batch_size
    if (ns.mixup > 0 or ns.cutmix > 0) and cfg.train.micro_batch_size % 2:
        raise ConfigError(f"--batch-size {cfg.train.micro_batch_size} must be even with --mixup/"
                          "--cutmix (timm Mixup pairs each image with its mirror in the batch)")
    return vit


def resolve_schedule(cfg: Config, ns: argparse.Namespace, num_train: int, num_val: int,
                     dp_size: int) -> dict:
    """Epochs -> iterations (train, warm-up, eval and save intervals, full-set evaluation) and
    the linear LR scaling over `dp_size` data-parallel ranks; returns the values for the log
    line."""
    tr = cfg.train
    gbs = tr.global_batch_size or tr.micro_batch_size * dp_size
    tr.global_batch_size = gbs
    per_epoch = num_train // gbs
    if per_epoch < 1:
        raise ConfigError(f"the {num_train} training images are fewer than the global batch "
                          f"{gbs} (--batch-size x processes)")
    by_iters = _given(ns, "train", "train_iters") or _given(ns, "train", "train_samples")
    if ns.epochs is not None and by_iters:
        raise ConfigError("--epochs and --train-iters/--train-samples are mutually exclusive")
    epochs = ns.epochs if ns.epochs is not None else DEIT_EPOCHS
    if not by_iters:
        tr.train_iters = epochs * per_epoch
    if not _given(ns, "train", "lr_warmup_iters"):
        tr.lr_warmup_iters = round(ns.warmup_epochs * per_epoch)
    if not _given(ns, "train", "eval_interval"):
        tr.eval_interval = per_epoch
    if not _given(ns, "train", "eval_iters"):
        tr.eval_iters = math.ceil(num_val / (tr.micro_batch_size * dp_size))
    if tr.save and not _given(ns, "train", "save_interval"):
        tr.save_interval = per_epoch
    base_lr = tr.lr
    if not ns.no_lr_scale:
        tr.lr = base_lr * gbs / 512
    return {"per_epoch": per_epoch, "base_lr": base_lr, "gbs": gbs}


def make_task(cfg: Config, ns: argparse.Namespace, layout: ParallelLayout) -> Task:
    """Resolve the recipe against the dataset and describe the DeiT task to the loop."""
    vit = resolve_model(cfg, ns)
    if len(cfg.data.data_path) > 1:
        raise ConfigError(f"--data-path takes one ImageFolder root for ViT, got "
                          f"{len(cfg.data.data_path)} values")
    data_path = cfg.data.data_path[0] if cfg.data.data_path else None
    train_src = vision.open_images(data_path, ns.hf_dataset, "train")
    val_src = vision.open_images(data_path, ns.hf_dataset, "val")
    classes = train_src.classes
    if ns.num_classes is None and classes is None:
        raise ConfigError("--num-classes is required (the dataset's label column has no names)")
    vit.num_classes = ns.num_classes or len(classes)
    if classes is not None and vit.num_classes < len(classes):
        raise ConfigError(f"--num-classes {vit.num_classes} < the dataset's {len(classes)} "
                          "classes")
    sched = resolve_schedule(cfg, ns, len(train_src), len(val_src), layout.dp)
    layout.validate(cfg)  # the recipe set the global batch
    tr = cfg.train
    repeats = vision.RA_REPEATS if ns.repeated_aug else 1

    def build_model(cfg: Config) -> VisionTransformer:
        print_rank0(f"> {describe(cfg, vit)}")
        print_rank0(f"> DeiT recipe: {len(train_src)} train / {len(val_src)} val images, "
                    f"{sched['per_epoch']} iterations per epoch, {tr.train_iters} iterations, "
                    f"global batch {sched['gbs']}, lr {sched['base_lr']:.3g} -> {tr.lr:.3g}, "
                    f"warm-up {tr.lr_warmup_iters} iterations, repeated aug x{repeats}, mixup "
                    f"{ns.mixup} cutmix {ns.cutmix} smoothing {ns.smoothing} reprob "
                    f"{ns.reprob} aa {ns.aa}, EMA {ns.model_ema_decay if ns.model_ema else 'off'}")
        return VisionTransformer(cfg, vit, init=False)

    def parallelize(model: VisionTransformer, layout: ParallelLayout) -> VisionTransformer:
        model = parallelize_vit(model, layout)
        if ns.model_ema:
            model.enable_ema()
        return model

    def build_datasets(cfg: Config, num_samples: list[int]):
        order = vision.EpochOrder(len(train_src), sched["per_epoch"] * sched["gbs"], tr.seed,
                                  repeats)
        train = vision.TrainImages(train_src, order,
                                   vision.train_transform(vit.img_size, ns.aa, ns.reprob),
                                   tr.seed)
        valid = vision.EvalImages(val_src, vision.eval_transform(vit.img_size),
                                  tr.micro_batch_size, layout.dp, tr.eval_iters)
        return train, valid, None

    collate_train = vision.TrainCollate(vit.num_classes, ns.mixup, ns.cutmix, ns.smoothing,
                                        tr.seed)

    def make_train_loader(cfg: Config, dataset, consumed: int, total: int,
                          layout: ParallelLayout):
        sampler = vision.SlotBatchSampler(total, consumed, tr.micro_batch_size,
                                          tr.global_batch_size, layout.dp_rank, layout.dp)
        # Own generator: the loader must not draw from the global RNG (exact resume).
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                           num_workers=cfg.data.num_workers,
                                           collate_fn=collate_train,
                                           pin_memory=torch.cuda.is_available(),
                                           generator=torch.Generator())

    soft_ce = SoftTargetCrossEntropy()

    def forward_step(engine, batch: dict, iteration: int):
        """Training: soft-target cross-entropy (+ router losses). Validation: loss, top-1 and
        top-5 of the model (and of its EMA), without mixup."""
        if "error" in batch:
            raise vision.ImageReadError(batch["error"])
        images = batch["image"]
        s = vit.num_tokens
        token_index = (batch["sample_index"].unsqueeze(1) * s
                       + torch.arange(s, device=images.device))
        kwargs = {"token_index": token_index, "iteration": iteration}
        if "target" in batch:
            logits, aux = engine(images, **kwargs)
            loss = soft_ce(logits, batch["target"])
            return loss + aux, {"loss": loss.detach(), "aux loss": aux.detach()}
        metrics = {}
        model = engine.module
        if model.has_ema:  # first, so the routing statistics are the model's
            ema_logits, _ = torch.func.functional_call(model, model.ema_parameters(), (images,),
                                                       kwargs, strict=False)
            metrics.update(vision.eval_metrics(ema_logits, batch["label"],
                                               batch["eval_scale"], prefix="ema "))
        logits, aux = engine(images, **kwargs)
        metrics.update(vision.eval_metrics(logits, batch["label"], batch["eval_scale"]))
        metrics["aux loss"] = aux.detach()
        return metrics["loss"], metrics

    def after_step(engine, iteration: int) -> None:
        engine.module.update_ema(ns.model_ema_decay)

    return Task(
        build_model=build_model,
        parallelize=parallelize,
        build_datasets=build_datasets,
        forward_step=forward_step,
        collate=vision.collate_eval,
        flops_per_sample=lambda cfg: 3 * vit_flops_per_image(cfg, vit),
        tokens_per_sample=lambda cfg: vit.num_tokens,
        loss_name="loss",
        make_train_loader=make_train_loader,
        after_step=after_step if ns.model_ema else None,
        report_perplexity=False,
        family="vit",
        shape_config={"img_size": vit.img_size, "patch_size": vit.patch_size,
                      "num_classes": vit.num_classes, "model_ema": bool(ns.model_ema)},
    )


def main(argv: list[str] | None = None):
    cfg, ns = parse_args(argv, description=__doc__, extra=add_deit_flags)
    extra = None
    if cfg.parallel.deepspeed_config:
        from megatron_selfroute.parallel.engine import merge_deepspeed_json

        extra = merge_deepspeed_json(cfg, cfg.parallel.deepspeed_config, ns.explicit_flags)
        ns.explicit_flags |= {f"train.{k}" for k in DEIT_TRAIN
                              if getattr(cfg.train, k) != getattr(Config().train, k)}
    layout = ParallelLayout.from_config(cfg)
    return pretrain(cfg, make_task(cfg, ns, layout), layout, extra)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
