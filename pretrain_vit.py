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
import sys

import torch
from timm.loss import SoftTargetCrossEntropy

from megatron_selfroute.arguments import ConfigError, parse_args
from megatron_selfroute.config import Config
from megatron_selfroute.data import vision
from megatron_selfroute.models.vit import (
    VisionTransformer,
    describe,
    parallelize_vit,
    vit_flops_per_image,
)
from megatron_selfroute.parallel.layout import ParallelLayout
from megatron_selfroute.training.deit_recipe import (  # noqa: F401  (resolve_* re-exported)
    DEIT_TRAIN,
    resolve_model,
    resolve_schedule,
)
from megatron_selfroute.training.logging import print_rank0
from megatron_selfroute.training.loop import Task, pretrain, run_main


def make_task(cfg: Config, ns: argparse.Namespace, layout: ParallelLayout) -> Task:
    """Resolve the recipe against the dataset and describe the DeiT task to the loop."""
    vit = resolve_model(cfg, ns)
    v = ns.vision
    if len(cfg.data.data_path) > 1:
        raise ConfigError(f"--data-path takes one ImageFolder root for ViT, got "
                          f"{len(cfg.data.data_path)} values")
    data_path = cfg.data.data_path[0] if cfg.data.data_path else None
    train_src = vision.open_images(data_path, v.hf_dataset, "train")
    val_src = vision.open_images(data_path, v.hf_dataset, "val")
    classes = train_src.classes
    if v.num_classes is None and classes is None:
        raise ConfigError("--num-classes is required (the dataset's label column has no names)")
    vit.num_classes = v.num_classes or len(classes)
    if classes is not None and vit.num_classes < len(classes):
        raise ConfigError(f"--num-classes {vit.num_classes} < the dataset's {len(classes)} "
                          "classes")
    sched = resolve_schedule(cfg, ns, len(train_src), len(val_src), layout.dp)
    layout.validate(cfg)  # the recipe set the global batch
    tr = cfg.train
    repeats = vision.RA_REPEATS if v.repeated_aug else 1

    def build_model(cfg: Config) -> VisionTransformer:
        run = cfg.train  # the loop's resolved config (--train-samples become iterations)
        print_rank0(f"> {describe(cfg, vit)}")
        print_rank0(f"> DeiT recipe: {len(train_src)} train / {len(val_src)} val images, "
                    f"{sched['per_epoch']} iterations per epoch, {run.train_iters} iterations, "
                    f"global batch {sched['gbs']}, lr {sched['base_lr']:.3g} -> {run.lr:.3g}, "
                    f"warm-up {run.lr_warmup_iters} iterations, repeated aug x{repeats}, mixup "
                    f"{v.mixup} cutmix {v.cutmix} smoothing {v.smoothing} reprob "
                    f"{v.reprob} aa {v.aa}, EMA {v.model_ema_decay if v.model_ema else 'off'}")
        return VisionTransformer(cfg, vit, init=False)

    def parallelize(model: VisionTransformer, layout: ParallelLayout) -> VisionTransformer:
        model = parallelize_vit(model, layout)
        if v.model_ema:
            model.enable_ema()
        return model

    def build_datasets(cfg: Config, num_samples: list[int]):
        order = vision.EpochOrder(len(train_src), sched["per_epoch"] * sched["gbs"], tr.seed,
                                  repeats)
        train = vision.TrainImages(train_src, order,
                                   vision.train_transform(vit.img_size, v.aa, v.reprob),
                                   tr.seed)
        valid = vision.EvalImages(val_src, vision.eval_transform(vit.img_size),
                                  tr.micro_batch_size, layout.dp, tr.eval_iters)
        return train, valid, None

    collate_train = vision.TrainCollate(vit.num_classes, v.mixup, v.cutmix, v.smoothing,
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
        engine.module.update_ema(v.model_ema_decay)

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
        after_step=after_step if v.model_ema else None,
        report_perplexity=False,
        family="vit",
        shape_config={"img_size": vit.img_size, "patch_size": vit.patch_size,
                      "num_classes": vit.num_classes, "model_ema": bool(v.model_ema)},
    )


def main(argv: list[str] | None = None):
    cfg, ns = parse_args(argv, description=__doc__, sections=("vision",))
    extra = None
    if cfg.parallel.deepspeed_config:
        from megatron_selfroute.parallel.engine import merge_deepspeed_json

        extra = merge_deepspeed_json(cfg, cfg.parallel.deepspeed_config, ns.explicit_flags)
        ns.explicit_flags |= {f"train.{k}" for k in DEIT_TRAIN
                              if getattr(cfg.train, k) != getattr(Config().train, k)}
    layout = ParallelLayout.from_config(cfg, check=False)  # make_task checks it after the recipe
    return pretrain(cfg, make_task(cfg, ns, layout), layout, extra)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
