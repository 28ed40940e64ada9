"""A state-dict adapter per model family: how the converters, the consolidated format and the
tools build a family's one-process model, where its experts sit, and whether its output layer is
tied to the input embedding.

The family of a checkpoint is recorded with it (`model_family` in run_state.json and the
consolidated config.json, with the image `shape_config` of a ViT); a DeepSpeed checkpoint written
before that field existed is a ViT when its `shape_config` names an image size, else a GPT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from megatron_selfroute.checkpoint import CheckpointFormatError
from megatron_selfroute.config import Config
from megatron_selfroute.parallel.layout import ParallelLayout

EXPERT_MARK = ".deepspeed_moe.experts.deepspeed_experts."


def _build_gpt(cfg: Config, shape: dict, layout: ParallelLayout | None = None) -> nn.Module:
    from megatron_selfroute.models.gpt import GPTModel, parallelize_gpt

    return parallelize_gpt(GPTModel(cfg, init=False), layout or ParallelLayout.single(cfg),
                           init=False)


def _build_vit(cfg: Config, shape: dict, layout: ParallelLayout | None = None) -> nn.Module:
    from megatron_selfroute.models.vit import VisionTransformer, ViTConfig, parallelize_vit

    missing = {"img_size", "patch_size", "num_classes"} - set(shape)
    if missing:
        raise CheckpointFormatError(f"ViT checkpoint without its image shape {sorted(missing)}")
    vit = ViTConfig(img_size=shape["img_size"], patch_size=shape["patch_size"],
                    num_classes=shape["num_classes"])
    model = parallelize_vit(VisionTransformer(cfg, vit, init=False),
                            layout or ParallelLayout.single(cfg), init=False)
    if shape.get("model_ema"):
        model.enable_ema()
    return model


@dataclass(frozen=True)
class ModelFamily:
    """What the checkpoint tools need to know about one model family."""

    name: str
    block_prefix: str  # module path of block i is f"{block_prefix}.{i}"
    # (cfg, shape_config[, layout]): uninitialised; one process with every expert by default,
    # else this rank's part of `layout` (its experts, its tensor-parallel shards)
    build: Callable[..., nn.Module]
    tied_output: Callable[[Config], bool]  # lm_head shares the input embedding (stored once)
    hf_export: bool

    def build_parallel(self, cfg: Config, shape: dict, layout: ParallelLayout) -> nn.Module:
        """This rank's model of `layout`, uninitialised (a checkpoint fills it)."""
        return self.build(cfg, shape, layout)

    def expert_prefix(self, block: int, expert: int) -> str:
        """State-dict prefix of one global expert of the MoE layer in `block`."""
        return f"{self.block_prefix}.{block}.mlp{EXPERT_MARK}{expert}."


FAMILIES: dict[str, ModelFamily] = {
    "gpt": ModelFamily("gpt", "transformer.h", _build_gpt,
                       lambda cfg: not cfg.model.untie_embeddings_and_output_weights, True),
    "vit": ModelFamily("vit", "blocks", _build_vit, lambda cfg: False, False),
}


def family_of(record: dict) -> ModelFamily:
    """The family named by a run state or consolidated config (older records: inferred)."""
    name = record.get("model_family")
    if name is None:
        name = "vit" if "img_size" in (record.get("shape_config") or {}) else "gpt"
    if name not in FAMILIES:
        raise CheckpointFormatError(f"unknown model family {name!r} (known: "
                                    f"{', '.join(FAMILIES)})")
    return FAMILIES[name]
