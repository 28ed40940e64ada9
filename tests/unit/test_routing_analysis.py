"""tools/analyze_routing.py against a hand computation on models whose routing is known.

The crafted model: every weight zero except LayerNorm gains and the token embeddings, so the
residual stream stays the embedding. Each token's embedding is +-1 (mean 0, variance 1, so
LayerNorm leaves it unchanged) with routing coordinates [1, 1, -1, -1] for even ids and
[-1, -1, 1, 1] for odd ids: block 0 (self-routing, top-2) sends even tokens to experts {0, 1} and
odd ones to {2, 3}. Block 1's LayerNorm gain/bias on the routing coordinates set its routing.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_selfroute.data.indexed_dataset import IndexedDatasetBuilder
from megatron_selfroute.models.gpt import GPTModel
from tests.integration.helpers import run_main, save_model, tiny_config


def crafted_model(gain1: list[float], bias1: list[float]) -> GPTModel:
    model = GPTModel(tiny_config("self", vocab=128, seq=16))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if (".ln_" in name or "ln_f" in name) and name.endswith("weight")
                    else 0.0)
        for t in range(128):
            base = torch.tensor([1.0] * 14 + [-1.0] * 14)[torch.randperm(28, generator=gen)]
            route = torch.tensor([1.0, 1, -1, -1]) * (1 if t % 2 == 0 else -1)
            model.transformer.wte.weight[t] = torch.cat([base, route])
        ln = model.transformer.h[1].ln_2
        ln.weight[28:] = torch.tensor(gain1)
        ln.bias[28:] = torch.tensor(bias1)
    return model.eval()


def entropy(f: list[float]) -> float:
    return -sum(x * math.log(x) for x in f if x > 0) / math.log(len(f))


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 128, n) for n in (50, 47, 60)]
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_document(d)
    builder.finalize(str(tmp_path / "d.idx"))
    return str(tmp_path / "d"), np.concatenate(docs)


def test_fractions_entropy_and_max_equal_hand_computation(tmp_path, dataset):
    prefix, stream = dataset
    n = 100  # 6 windows of 16 and a short one of 4; the third document is cut
    even = int((stream[:n] % 2 == 0).sum())
    odd = n - even
    a = save_model(crafted_model([1, -1, 0, 0], [0, 0, 0.5, 0]), tmp_path / "a")
    b = save_model(crafted_model([0, 0, 0, 0], [3, 2, 1, 0]), tmp_path / "b")
    out = tmp_path / "out"
    code, stdout, err = run_main("analyze_routing.py", "--load", str(a), str(b), "--data-path",
                                 prefix, "--tokens", str(n), "--labels", "A", "B",
                                 "--output-dir", str(out), "--batch-size", "4", "--no-progress")
    assert code == 0, err
    res = {r["label"]: r for r in json.loads((out / "routing.json").read_text())}
    # block 0: even -> {0, 1}, odd -> {2, 3}; block 1 of A: even -> {0, 2}, odd -> {1, 2}
    assert res["A"]["counts"] == [[even, even, odd, odd], [even, odd, n, 0]]
    assert res["B"]["counts"] == [[even, even, odd, odd], [n, n, 0, 0]]
    assert res["A"]["tokens"] == n
    f = {"A": [[even / (2 * n)] * 2 + [odd / (2 * n)] * 2,
               [even / (2 * n), odd / (2 * n), 0.5, 0.0]],
         "B": [[even / (2 * n)] * 2 + [odd / (2 * n)] * 2, [0.5, 0.5, 0.0, 0.0]]}
    for label, layers in f.items():
        want_h = [entropy(x) for x in layers]
        want_max = [max(x) for x in layers]
        assert res[label]["normalized_entropy"] == pytest.approx(want_h, abs=1e-12)
        assert res[label]["max_fraction"] == pytest.approx(want_max, abs=1e-12)
        assert res[label]["mean_normalized_entropy"] == pytest.approx(sum(want_h) / 2)
        assert res[label]["mean_max_fraction"] == pytest.approx(sum(want_max) / 2)
        assert f"| {label} | self | {n} | {sum(want_h) / 2:.4f} | {sum(want_max) / 2:.4f} |" \
            in stdout
    assert res["B"]["normalized_entropy"][1] == pytest.approx(0.5)  # log 2 / log 4
    csv_rows = (out / "routing.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4 and csv_rows[0].startswith("label,moe_layer,block")
    for name in ("entropy.png", "max_fraction.png", "heatmap_0_A.png", "heatmap_1_B.png",
                 "cross_layer_0_A.png", "cross_layer_1_B.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # dead experts: fraction below 1 / (10 x 4)
    assert res["A"]["dead_experts"] == [0, 1] and res["B"]["dead_experts"] == [0, 2]
    # cross-layer, B: block 1 sends every token to {0, 1} with expert 0 first, block 0 sends
    # even tokens to {0, 1}: top-k overlap = even / n; block 1's top-1 has no entropy: NMI 0
    cb = res["B"]["cross_layer"]
    assert cb["topk_overlap"][0][1] == pytest.approx(even / n, abs=1e-12)
    assert cb["chance_agreement"][0][1] == pytest.approx(cb["identity_agreement"][0][1])
    assert cb["nmi"][0][1] == 0.0 and cb["tokens"] == n
    for label in ("A", "B"):  # the crafted routing follows the token id only: the id-shuffled
        c = res[label]["cross_layer"]  # baseline equals the raw value
        assert c["shuffled_identity_agreement"][0][1] == c["identity_agreement"][0][1]
        assert c["shuffled_nmi"][1][0] == pytest.approx(c["nmi"][1][0], abs=1e-12)
    rows = (out / "cross_layer.csv").read_text().splitlines()
    assert rows[0].startswith("label,block_l,block_m,identity_agreement") and len(rows) == 5


def test_errors_are_one_line(tmp_path, dataset):
    prefix, _ = dataset
    dense = save_model(GPTModel(tiny_config(None)), tmp_path / "dense")
    moe = save_model(crafted_model([0] * 4, [0] * 4), tmp_path / "moe")
    for args, message in ((["--load", str(dense)], "no MoE layers"),
                          (["--load", str(moe), "--tokens", "1000"], "holds only 157 tokens"),
                          (["--load", str(moe), "--labels", "x", "y"], "2 names for 1")):
        code, _, err = run_main("analyze_routing.py", *args, "--data-path", prefix,
                                "--output-dir", str(tmp_path / "o"), "--no-progress")
        assert code == 1 and message in err and err.strip().count("\n") == 0, err
