"""--train-data-path / --valid-data-path / --test-data-path (Megatron core): each split reads
its own files whole; samples equal those of a --split that gives the file entirely to that split;
bad combinations are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_selfroute.arguments import ConfigError, parse_args
from megatron_selfroute.data.gpt_dataset import (
    build_split_path_datasets,
    build_train_valid_test_datasets,
)
from megatron_selfroute.data.indexed_dataset import IndexedDatasetBuilder


def _prefix(tmp_path, name, seed, n_docs):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
    for _ in range(n_docs):
        builder.add_document(rng.integers(0, 500, rng.integers(20, 60)))
    builder.finalize(str(tmp_path / f"{name}.idx"))
    return str(tmp_path / name)


def test_each_split_reads_its_own_file_whole(tmp_path):
    train, valid = _prefix(tmp_path, "tr", 0, 30), _prefix(tmp_path, "va", 1, 8)
    tr, va, te = build_split_path_datasets([[train], [valid], []], 16, 3, [20, 6, 0],
                                           cache_dir=str(tmp_path / "cache"))
    assert te is None
    assert tr.indexed_dataset.prefix == train and va.indexed_dataset.prefix == valid
    assert tr.document_ids.tolist() == list(range(30))
    assert va.document_ids.tolist() == list(range(8))
    # the same samples as --data-path FILE --split giving the file wholly to that split
    ref_tr = build_train_valid_test_datasets([train], "1,0,0", 16, 3, [20, 0, 0],
                                             cache_dir=str(tmp_path / "c2"))[0]
    ref_va = build_train_valid_test_datasets([valid], "0,1,0", 16, 3, [0, 6, 0],
                                             cache_dir=str(tmp_path / "c3"))[1]
    for ds, ref in ((tr, ref_tr), (va, ref_va)):
        assert len(ds) == len(ref)
        for i in range(len(ds)):
            assert torch.equal(ds[i]["tokens"], ref[i]["tokens"])
    # a weighted blend per split works as with --data-path
    other = _prefix(tmp_path, "tr2", 2, 12)
    blend = build_split_path_datasets([["0.7", train, "0.3", other], [], []], 16, 3,
                                      [40, 0, 0], cache_dir=str(tmp_path / "c4"))[0]
    assert len(blend) == 40 and type(blend).__name__ == "BlendedDataset"


BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "100"]


@pytest.mark.parametrize("flags,needle", [
    (["--data-path", "a", "--valid-data-path", "b"],
     "--data-path and --valid-data-path are mutually exclusive"),
    (["--valid-data-path", "b"], "--valid-data-path needs --train-data-path"),
    (["--mock-data", "--train-data-path", "a"], "--mock-data and --train-data-path"),
    (["--eval-every-tokens", "0"], "--eval-every-tokens must be >= 1"),
])
def test_bad_combinations(flags, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        parse_args(BASE + flags)
    assert "\n" not in str(e.value)


def test_eval_every_tokens_sets_the_interval():
    from megatron_selfroute.parallel.layout import ParallelLayout
    from megatron_selfroute.training.loop import resolve_config

    cfg, _ = parse_args(BASE + ["--eval-every-tokens", "512", "--global-batch-size", "8",
                                "--micro-batch-size", "8", "--train-iters", "10"])
    assert resolve_config(cfg, ParallelLayout.single(cfg)).train.eval_interval == 4  # 8 x 16
    cfg.train.eval_every_tokens = 500
    with pytest.raises(ConfigError, match="not a multiple of the 128 tokens of a step"):
        resolve_config(cfg, ParallelLayout.single(cfg))
