"""Pretrain a GPT-2 language model, dense or MoE (any router), on DeepSpeed.

Launch with `python`, `torchrun --nproc-per-node N`, or the `deepspeed` launcher; flags follow
Megatron-LM (see README). Thin: model builder + dataset builder + forward step, then train.
"""
from __future__ import annotations

import sys

import torch

from megatron_selfroute.arguments import parse_args
from megatron_selfroute.config import Config
from megatron_selfroute.data.gpt_dataset import (
    build_split_path_datasets,
    build_train_valid_test_datasets,
    collate_gpt_samples,
)
from megatron_selfroute.data.samplers import MockGPTDataset
from megatron_selfroute.data.token_frequency import token_frequencies
from megatron_selfroute.data.tokenizer import build_tokenizer
from megatron_selfroute.models.gpt import GPTModel, gpt_flops_per_token, parallelize_gpt
from megatron_selfroute.moe.balancing import balance_hash_tables
from megatron_selfroute.parallel.layout import ParallelLayout
from megatron_selfroute.training.logging import is_rank0, print_rank0
from megatron_selfroute.training.loop import Task, pretrain, run_main


def check_batch(engine, batch: dict) -> None:
    """Token ids must fit the vocabulary (checked on the host batch: no device sync)."""
    vocab = engine.module.vocab_size
    top = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
    if top >= vocab:
        raise ValueError(f"token id {top} >= vocabulary size {vocab} in sample "
                         f"{int(batch['sample_index'][0])}: the data was tokenised with another "
                         "tokenizer than --tokenizer-type/--vocab-size")


def forward_step(engine, batch: dict, iteration: int):
    """Mean lm loss over loss-masked tokens (+ router losses)."""
    tokens = batch["tokens"]
    seq = tokens.shape[1]
    token_index = batch["sample_index"].unsqueeze(1) * seq + torch.arange(seq,
                                                                          device=tokens.device)
    mask = batch["attention_mask"]
    out = engine(tokens, position_ids=batch["position_ids"],
                 attention_mask=None if mask is None else ~mask, labels=batch["labels"],
                 token_index=token_index, iteration=iteration)
    loss_mask = batch["loss_mask"].float()
    lm = (out.loss * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return lm + out.aux_loss, {"lm loss": lm.detach(), "aux loss": out.aux_loss.detach()}


def make_task(cfg: Config) -> Task:
    """Resolve the tokenizer (vocabulary size) and describe the GPT task to the loop."""
    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model,
                                cfg.model.vocab_size)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size

    def build_datasets(cfg: Config, num_samples: list[int]):
        m = cfg.model
        if d.mock_data:
            return tuple(MockGPTDataset(n, m.seq_length, m.vocab_size, cfg.train.seed + i)
                         for i, n in enumerate(num_samples))
        options = dict(cache_dir=d.data_cache_path, reset_position_ids=d.reset_position_ids,
                       reset_attention_mask=d.reset_attention_mask,
                       eod_mask_loss=d.eod_mask_loss, eod_token=tokenizer.eod,
                       mmap=not d.no_mmap_bin_files)
        if d.train_data_path:  # Megatron core's per-split files, each used whole
            return build_split_path_datasets(
                [d.train_data_path, d.valid_data_path, d.test_data_path], m.seq_length,
                cfg.train.seed, num_samples, **options)
        if not d.data_path:
            raise ValueError("--data-path is required (or --train-data-path, or --mock-data for "
                             "synthetic tokens)")
        return build_train_valid_test_datasets(d.data_path, d.split, m.seq_length,
                                               cfg.train.seed, num_samples, **options)

    def init_from_data(model, train_ds) -> None:
        """Balanced hash tables from the training split's token frequencies."""
        moe = cfg.moe
        if moe.is_moe and moe.router_type == "hash" and moe.hash_assignment == "balanced":
            freq = token_frequencies(train_ds, cfg.model.padded_vocab_size,
                                     progress=is_rank0())
            balance_hash_tables(model, freq)
            print_rank0(f"> balanced hash tables from {int(freq.sum())} training-split tokens")

    return Task(
        build_model=lambda cfg: GPTModel(cfg, init=False),
        init_from_data=init_from_data,
        parallelize=parallelize_gpt,
        build_datasets=build_datasets,
        forward_step=forward_step,
        check_batch=check_batch,
        collate=collate_gpt_samples,
        flops_per_sample=lambda cfg: 3 * gpt_flops_per_token(cfg) * cfg.model.seq_length,
        tokens_per_sample=lambda cfg: cfg.model.seq_length,
    )


def main(argv: list[str] | None = None):
    cfg, ns = parse_args(argv, description=__doc__)
    extra = None
    if cfg.parallel.deepspeed_config:
        from megatron_selfroute.parallel.engine import merge_deepspeed_json

        extra = merge_deepspeed_json(cfg, cfg.parallel.deepspeed_config, ns.explicit_flags)
    layout = ParallelLayout.from_config(cfg)
    return pretrain(cfg, make_task(cfg), layout, extra)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
