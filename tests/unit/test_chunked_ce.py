"""The chunked output layer + cross-entropy (models/chunked_ce.py) against the plain path
(`lm_head` then `F.cross_entropy` on the sliced fp32 logits): losses and gradients within fp32
tolerance, padded rows never predicted and never updated, the saved activation bytes of the
output layer at vocabulary 50,304, and a GPT model with --cross-entropy-chunk-size against the
same model without it."""
import pytest
import torch
import torch.nn.functional as F

from megatron_selfroute.models.chunked_ce import IGNORE_INDEX, linear_cross_entropy
from megatron_selfroute.models.gpt import GPTModel
from tests.integration.helpers import tiny_config


def plain(hidden, weight, labels, vocab):
    return F.cross_entropy((hidden @ weight.t())[:, :vocab].float(), labels, reduction="none")


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_losses_and_gradients_equal_the_plain_path(chunk):
    g = torch.Generator().manual_seed(0)
    n, h, vocab, padded = 37, 24, 50, 64
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float()
    weight = torch.randn(padded, h, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[5] = IGNORE_INDEX
    scale = torch.rand(n, generator=g)  # a non-uniform incoming gradient (a loss mask)
    results = []
    for fn in (plain, lambda *a: linear_cross_entropy(*a, chunk)):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(hd, w, labels, vocab)
        (loss * scale).sum().backward()
        results.append((loss.detach(), hd.grad, w.grad))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh1, gh0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-6)
    assert l1[5] == 0 and not gh1[5].any()  # an ignored label: no loss, no gradient
    assert not gw1[vocab:].any()  # padded rows: never predicted, never updated


def test_padded_rows_are_never_predicted():
    """A padded row with a huge logit changes nothing: it is outside the softmax."""
    hidden = torch.ones(4, 3)
    weight = torch.zeros(8, 3)
    weight[6] = 100.0  # padding row
    labels = torch.tensor([0, 1, 2, 3])
    loss = linear_cross_entropy(hidden, weight, labels, 5, 2)
    torch.testing.assert_close(loss, torch.full((4,), torch.log(torch.tensor(5.0)).item()))


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_activation_bytes_at_gpt2_vocabulary():
    """The output layer's saved tensors at vocabulary 50,304 (padded from 50,257): the chunked
    path keeps at most a quarter of the plain path's (here: the hidden states and one fp32
    log-sum-exp per token, against the fp32 logits)."""
    n, h, vocab, padded = 512, 64, 50257, 50304
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(padded, h, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    plain_bytes = saved_bytes(lambda: plain(hidden, weight, labels, vocab))
    chunk_bytes = saved_bytes(lambda: linear_cross_entropy(hidden, weight, labels, vocab, 128))
    assert plain_bytes >= n * vocab * 4  # the logits alone
    assert chunk_bytes <= plain_bytes / 4, (chunk_bytes, plain_bytes)
    print(f"saved bytes: plain {plain_bytes / 2**20:.1f} MiB, chunked "
          f"{chunk_bytes / 2**20:.2f} MiB ({plain_bytes / chunk_bytes:.0f}x less)")


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_with_chunked_loss_equals_plain(tied):
    cfg = tiny_config("self", vocab=100)
    cfg.model.untie_embeddings_and_output_weights = not tied
    torch.manual_seed(0)
    ref = GPTModel(cfg)
    cfg2 = tiny_config("self", vocab=100)
    cfg2.model.untie_embeddings_and_output_weights = not tied
    cfg2.model.cross_entropy_chunk_size = 5
    chunked = GPTModel(cfg2)
    chunked.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    outs = []
    for model in (ref, chunked):
        model.zero_grad()
        out = model(ids, labels=labels)
        (out.loss.mean() + out.aux_loss).backward()
        outs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_chunked_loss_follows_the_plain_run(tmp_path):
    """pretrain_gpt.py with --cross-entropy-chunk-size 7 (not dividing the 2 x 16 tokens of a
    micro-batch) gives the plain run's training losses within fp32 tolerance (its validations at
    iterations 3 and 6 go through the chunked path too)."""
    from tests.distributed.train_cases import MOCK, run_layout

    base = MOCK + ["--router-type", "learned", "--micro-batch-size", "2", "--train-iters", "6",
                   "--eval-interval", "3", "--eval-iters", "2"]
    plain_run, chunked_run = run_layout(tmp_path, 1, [base, base + ["--cross-entropy-chunk-size",
                                                                    "7"]])
    assert plain_run["losses"].keys() == chunked_run["losses"].keys() and len(
        plain_run["losses"]) == 6
    for it, loss in plain_run["losses"].items():
        assert chunked_run["losses"][it] == pytest.approx(loss, rel=1e-5), it
