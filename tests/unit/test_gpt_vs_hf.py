"""The dense GPT equals Hugging Face's GPT2LMHeadModel given the same weights (independent code)."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from megatron_selfroute.config import Config
from megatron_selfroute.models.gpt import GPTModel
from megatron_selfroute.models.hf_gpt2 import from_hf_state_dict, to_hf_state_dict


def test_dense_gpt_logits_equal_huggingface():
    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms trivially: make them count
        for n, p in hf.named_parameters():
            if n.endswith("bias") or ".ln_" in n or "ln_f" in n:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = 3, 48, 4
    m.seq_length, m.vocab_size, m.make_vocab_size_divisible_by = 32, 101, 64
    ours = GPTModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(
        from_hf_state_dict(hf.state_dict(), m.padded_vocab_size), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    ids = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == want.shape == (2, 32, 101)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the loss path agrees with a cross entropy over HF's logits
    labels = torch.roll(ids, -1, 1)
    loss = ours(ids, labels=labels).loss
    ref = torch.nn.functional.cross_entropy(want.reshape(-1, 101), labels.reshape(-1),
                                            reduction="none").view(2, 32)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # and back: exporting gives HF exactly its own weights
    back = to_hf_state_dict(ours.state_dict(), 101)
    for n, t in hf.state_dict().items():
        if n in back:
            torch.testing.assert_close(back[n], t, rtol=0, atol=0)
