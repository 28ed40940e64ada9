"""Issue 16 against hand computations and independent references: hash tables, the balanced
assignment's bound, the expert-bias rule and its effect, fp32 buffers under bf16, orthogonal
projections, shared experts against a naive per-token block, parameter and FLOP counts by
formula, dead experts and the cross-layer metrics on crafted routings."""
import math

import numpy as np
import pytest
import torch

from megatron_selfroute.arguments import parse_args
from megatron_selfroute.config import Config
from megatron_selfroute.data.gpt_dataset import build_train_valid_test_datasets, parse_split
from megatron_selfroute.data.indexed_dataset import IndexedDataset
from megatron_selfroute.data.token_frequency import token_frequencies
from megatron_selfroute.models.gpt import GPTModel, gpt_flops_per_token, num_parameters
from megatron_selfroute.moe.balancing import ExpertBiasUpdater, balance_hash_tables
from megatron_selfroute.moe.context import RoutingContext
from megatron_selfroute.moe.cross_layer import CrossLayerAccumulator, shuffle_within_ids
from megatron_selfroute.moe.layer import MoELayer
from megatron_selfroute.moe.router import balanced_hash_table
from megatron_selfroute.moe.stats import dead_experts
from megatron_selfroute.seeding import mix_seed

TINY = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "8", "--num-experts", "4", "--vocab-size", "60"]


def model_of(*flags, init=True):
    cfg, _ = parse_args(TINY + list(flags))
    return GPTModel(cfg, init=init), cfg


# ---- hash routing ---------------------------------------------------------------------------

def test_random_hash_table_is_the_documented_draw():
    model, cfg = model_of("--router-type", "hash", "--seed", "11")
    vocab, E, k = cfg.model.padded_vocab_size, 4, 2
    for layer in model.moe_layers:  # reference: per layer, argsort of uniforms from (seed, layer)
        gen = torch.Generator().manual_seed(mix_seed(11, 0x4A54, layer.layer_number))
        want = torch.rand(vocab, E, generator=gen).argsort(dim=1)[:, :k]
        assert torch.equal(layer.router.table, want)
        assert all(len(set(row)) == k for row in layer.router.table.tolist())  # distinct
    t = [lay.router.table for lay in model.moe_layers]
    assert not torch.equal(t[0], t[1])
    shared, _ = model_of("--router-type", "hash", "--seed", "11", "--hash-shared")
    ts = [lay.router.table for lay in shared.moe_layers]
    assert torch.equal(ts[0], ts[1]) and torch.equal(ts[1], ts[2])


def test_balanced_hash_table_by_hand():
    # k = 1, E = 3, frequencies of ids 0..6; greedy by decreasing frequency onto the least load;
    # unseen ids onto the experts with the fewest ids.
    table = balanced_hash_table(torch.tensor([10., 1., 6., 5., 0., 0., 3.]), 3, 1)
    assert table.view(-1).tolist() == [0, 1, 1, 2, 0, 1, 2]
    # k = 2: id 0 (4) -> 0,1; id 1 (3) -> 2, then 0 (tie on load 4 and one id: lower index);
    # id 2 (2) -> 2 (3), 1 (4); id 3 (1) -> 2 (5), 1 (6). Loads 7, 7, 6.
    table = balanced_hash_table(torch.tensor([4., 3., 2., 1.]), 3, 2)
    assert table.tolist() == [[0, 1], [2, 0], [2, 1], [2, 1]]


def _loads(table, freq, E):
    load = torch.zeros(E, dtype=torch.float64)
    for j in range(table.shape[1]):
        load.index_add_(0, table[:, j], freq)
    return load


def test_balanced_assignment_on_the_training_split(shakespeare_prefix):
    """Frequencies equal an independent count of the split's documents, and the loads are
    within the documented bound (max - min <= the most frequent id's count)."""
    split = "95,5,0"
    train, _, _ = build_train_valid_test_datasets([shakespeare_prefix], split, 16, 1,
                                                  [10, 0, 0])
    vocab = 50304
    freq = token_frequencies(train, vocab, progress=False)
    data = IndexedDataset(shakespeare_prefix)
    bounds = parse_split(split, data.num_documents)
    ref = np.zeros(vocab, dtype=np.int64)
    for d in range(bounds[0], bounds[1]):
        np.add.at(ref, np.asarray(data[d], dtype=np.int64), 1)
    assert torch.equal(freq, torch.from_numpy(ref.astype(np.float64)))
    for k in (1, 2):
        table = balanced_hash_table(freq, 8, k)
        load = _loads(table, freq, 8)
        assert load.sum() == k * freq.sum()
        assert load.max() - load.min() <= freq.max(), (load, freq.max())
        # far better than a random table on the same text
        rand = torch.rand(vocab, 8, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :k]
        rload = _loads(rand, freq, 8)
        assert load.max() - load.min() < (rload.max() - rload.min()) / 4


def test_balanced_tables_in_the_model_relabel_per_layer_and_keep_balance():
    model, cfg = model_of("--router-type", "hash", "--hash-assignment", "balanced")
    freq = torch.arange(cfg.model.padded_vocab_size, dtype=torch.float64) % 7
    base = balance_hash_tables(model, freq)
    tables = [lay.router.table for lay in model.moe_layers]
    assert not torch.equal(tables[0], tables[1])  # relabelled per layer ...
    for t in tables:  # ... so each layer's loads are a permutation of the base loads
        assert sorted(_loads(t, freq, 4).tolist()) == sorted(_loads(base, freq, 4).tolist())
    shared, _ = model_of("--router-type", "hash", "--hash-assignment", "balanced",
                         "--hash-shared")
    balance_hash_tables(shared, freq)
    assert all(torch.equal(lay.router.table, base) for lay in shared.moe_layers)


def test_hash_experts_follow_the_token_id_only():
    model, _ = model_of("--router-type", "hash")
    a = torch.tensor([[5, 7, 9, 5, 1, 2, 3, 4]])
    b = torch.tensor([[9, 9, 5, 30, 7, 7, 0, 5], [1, 5, 2, 2, 2, 2, 2, 2]])  # other positions
    for ids in (a, b):
        model(ids)
        for layer, got in zip(model.moe_layers, model.routing_ids(), strict=True):
            assert torch.equal(got, layer.router.table[ids.reshape(-1)])


def test_hash_weights_are_one_over_k_and_the_table_is_saved():
    model, _ = model_of("--router-type", "hash", "--moe-router-topk", "3")
    router = model.moe_layers[0].router
    out = router(torch.randn(4, 32), RoutingContext(None, torch.tensor([1, 2, 3, 1]), 0))
    assert torch.equal(out.probs_TK, torch.full((4, 3), 1 / 3))
    assert "transformer.h.0.mlp.router.table" in model.state_dict()
    with pytest.raises(RuntimeError, match="needs the token ids"):
        router(torch.randn(4, 32), RoutingContext())


# ---- expert bias ----------------------------------------------------------------------------

def test_bias_update_by_hand_and_fp32_under_bf16():
    model, _ = model_of("--router-type", "self", "--moe-router-enable-expert-bias")
    router = model.moe_layers[0].router
    router.update_load_bias(torch.tensor([5, 1, 3, 3]), 0.01)  # mean 3
    assert torch.equal(router.load_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))  # fp32
    updater = ExpertBiasUpdater(model, 0.5)
    updater.add(torch.tensor([[2, 0, 1, 1]] * 3))  # two micro-batches summed
    updater.add(torch.tensor([[0, 2, 0, 6]] * 3))  # -> [2, 2, 1, 7], mean 3
    updater.step(skipped=False)
    assert router.load_bias.tolist() == pytest.approx([0.49, 0.51, 0.5, -0.5], abs=1e-7)
    before = router.load_bias.clone()
    updater.add(torch.tensor([[9, 0, 0, 0]] * 3))
    updater.step(skipped=True)  # a skipped step changes nothing and forgets its counts
    assert torch.equal(router.load_bias, before) and updater.counts is None
    model.to(torch.bfloat16)
    assert router.load_bias.dtype == torch.float32 and torch.equal(router.load_bias, before)
    assert model.transformer.wte.weight.dtype == torch.bfloat16


def _imbalanced_layer(bias: bool) -> MoELayer:
    cfg = Config()
    cfg.model.hidden_size, cfg.model.ffn_hidden_size = 16, 16
    m = cfg.moe
    m.num_experts, m.moe_router_topk, m.router_type = 4, 2, "learned"
    m.moe_router_enable_expert_bias = bias
    torch.manual_seed(0)
    layer = MoELayer(cfg.model, m, layer_number=0, moe_index=0, seed=0)
    layer.parallelize(0, 1, None, torch.device("cpu"))
    layer.reset_experts(0, std=0.1)
    with torch.no_grad():  # expert 0 and 1 take almost every token
        layer.router.weight.copy_(torch.randn(4, 16) * 0.05)
        layer.router.weight[0, :] += 0.1
        layer.router.weight[1, :] += 0.06
    return layer


def test_bias_balances_a_deliberately_imbalanced_learned_router():
    """Behavioural: 80 steps of training, the same data; only the bias run gets balanced."""
    fractions = {}
    for bias in (False, True):
        layer = _imbalanced_layer(bias)
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        updater = ExpertBiasUpdater(torch.nn.ModuleList([layer]), 0.05)
        gen = torch.Generator().manual_seed(1)
        for _ in range(80):
            x = torch.randn(64, 16, generator=gen) + 1.0
            y, _ = layer(x)
            loss = (y - x.flip(-1)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if updater:  # the training loop's guard: only layers with a bias
                updater.add(layer.last_tokens_per_expert.view(1, -1))
                updater.step(skipped=False)
        x = torch.randn(512, 16, generator=gen) + 1.0
        layer(x)
        c = layer.last_tokens_per_expert.double()
        fractions[bias] = float(c.max() / c.sum())
    assert fractions[False] > 0.45, fractions  # stays on experts 0 and 1
    assert fractions[True] < 0.35, fractions  # near 1/4 each


# ---- orthogonal fixed-random, shared experts, counts -----------------------------------------

def test_orthogonal_projection_rows_at_the_stated_norm():
    model, cfg = model_of("--router-type", "fixed-random", "--fixed-random-init", "orthogonal")
    h, std = 32, cfg.model.init_method_std
    projs = [lay.router.proj for lay in model.moe_layers]
    for p in projs:
        gram = p.double() @ p.double().T
        torch.testing.assert_close(gram, (std * math.sqrt(h)) ** 2 * torch.eye(4, dtype=gram.dtype),
                                   atol=1e-6, rtol=0)
        assert p.dtype == torch.float32
    assert not torch.allclose(projs[0], projs[1])
    again, _ = model_of("--router-type", "fixed-random", "--fixed-random-init", "orthogonal")
    for a, b in zip(projs, [lay.router.proj for lay in again.moe_layers], strict=True):
        assert torch.equal(a, b)  # a pure function of the seed: the same on every rank
    shared, _ = model_of("--router-type", "fixed-random", "--fixed-random-init", "orthogonal",
                         "--fixed-random-shared")
    ps = [lay.router.proj for lay in shared.moe_layers]
    assert torch.equal(ps[0], ps[2])
    # the Gaussian projection it replaces has rows of about the same norm
    gauss, _ = model_of("--router-type", "fixed-random", "--hidden-size", "768",
                        "--num-attention-heads", "12")
    norms = gauss.moe_layers[0].router.proj.norm(dim=1)
    assert abs(float(norms.mean()) - std * math.sqrt(768)) < 0.05


def _mlp(mod, v):
    return mod.c_proj(torch.nn.functional.gelu(mod.c_fc(v), approximate="tanh"))


def test_shared_expert_block_against_a_naive_per_token_reference():
    """Per token: the shared MLP plus the k experts of the largest sigmoid scores, weighted by
    those scores over their sum (DeepSeek-V3), added to the residual."""
    model, _ = model_of("--router-type", "learned", "--moe-shared-expert-intermediate-size",
                        "24", "--moe-router-score-function", "sigmoid")
    block = model.transformer.h[1]
    x = torch.randn(2, 8, 32)
    got, _ = block(x, None, RoutingContext())
    experts = block.mlp.local_experts
    w = block.mlp.router.weight
    with torch.no_grad():
        mid = x + block.attn(block.ln_1(x), None)
        h = block.ln_2(mid).reshape(-1, 32)
        rows = []
        for t in range(h.shape[0]):
            s = [torch.sigmoid(torch.dot(h[t], w[e])) for e in range(4)]
            top = sorted(range(4), key=lambda e: -s[e].item())[:2]
            total = s[top[0]] + s[top[1]]
            routed = sum(s[e] / total * _mlp(experts[e], h[t]) for e in top)
            rows.append(_mlp(block.shared_mlp, h[t]) + routed)
        ref = torch.stack(rows)
    torch.testing.assert_close(got, mid + ref.view(2, 8, 32), atol=1e-5, rtol=1e-4)


def test_parameter_and_flop_counts_by_formula():
    flags = ["--disable-bias-linear", "--disable-bias-layernorm", "--router-type", "learned"]
    plain, cfg = model_of(*flags)
    shared, cfg_s = model_of(*flags, "--moe-shared-expert-intermediate-size", "24")
    L, D, E, F, S, V, P = 3, 32, 4, 128, 24, cfg.model.padded_vocab_size, 8
    per_layer = 2 * D + 4 * D * D + E * 2 * D * F + D * E
    assert num_parameters(plain) == V * D + P * D + L * per_layer + D
    assert num_parameters(shared) == num_parameters(plain) + L * 2 * D * S
    assert gpt_flops_per_token(cfg_s) - gpt_flops_per_token(cfg) == L * 2 * 2 * D * S


# ---- metrics ---------------------------------------------------------------------------------

def test_dead_experts_by_hand():
    counts = torch.tensor([[100, 0, 1, 99], [50, 50, 50, 50]])  # 1/(10 x 4) = 0.025
    assert dead_experts(counts).tolist() == [2, 0]


def _result(ids_LTK, tids=None):
    acc = CrossLayerAccumulator(ids_LTK.shape[0], 4, ids_LTK.shape[2])
    half = ids_LTK.shape[1] // 2
    for sl in (slice(0, half), slice(half, None)):  # streamed in two batches
        acc.add(ids_LTK[:, sl], None if tids is None else tids[sl])
    return acc.result()


def test_cross_layer_metrics_on_crafted_routings():
    gen = torch.Generator().manual_seed(0)
    T = 200_000
    a = torch.randint(0, 4, (T,), generator=gen)
    b = torch.randint(0, 4, (T,), generator=gen)
    second = (a + 1) % 4
    # layers 0 and 1 identical, layer 2 independent
    ids = torch.stack([torch.stack([a, second], -1), torch.stack([a, second], -1),
                       torch.stack([b, (b + 2) % 4], -1)])
    r = _result(ids)
    agree, chance = np.asarray(r["identity_agreement"]), np.asarray(r["chance_agreement"])
    nmi, overlap = np.asarray(r["nmi"]), np.asarray(r["topk_overlap"])
    assert agree[0, 1] == 1.0 and nmi[0, 1] == pytest.approx(1.0) and overlap[0, 1] == 1.0
    assert chance[0, 2] == pytest.approx(0.25, abs=0.005)
    assert abs(agree[0, 2] - chance[0, 2]) < 0.01 and nmi[0, 2] < 0.001
    # overlap of independent pairs {a, a+1} and {b, b+2}: E|S ∩ S'| / k = (2 x 2 / 4) / 2
    assert overlap[0, 2] == pytest.approx(0.5, abs=0.01)


def test_token_shuffled_baseline():
    gen = torch.Generator().manual_seed(1)
    T = 60_000
    tids = torch.randint(0, 50, (T,), generator=gen)
    table = torch.randint(0, 4, (2, 50), generator=gen)
    # hash routing: a function of the token id only -> the shuffle changes nothing
    ids = torch.stack([table[0][tids], table[1][tids]]).unsqueeze(-1)
    r = _result(ids, tids)
    assert r["shuffled_identity_agreement"][0][1] == r["identity_agreement"][0][1]
    assert r["shuffled_nmi"][0][1] == pytest.approx(r["nmi"][0][1], abs=1e-12)
    # context routing: both layers follow the position, not the id -> shuffle falls to chance
    ctxt = torch.randint(0, 4, (T,), generator=gen)
    r = _result(torch.stack([ctxt, ctxt]).unsqueeze(-1), tids)
    assert r["identity_agreement"][0][1] == 1.0
    assert r["shuffled_identity_agreement"][0][1] == pytest.approx(0.25, abs=0.02)
    # the shuffle is a permutation within each token id
    v = np.arange(20)
    t = np.array([0, 1] * 10)
    s = shuffle_within_ids(v, t, 3)
    assert sorted(s.tolist()) == v.tolist() and np.all(s % 2 == v % 2)
