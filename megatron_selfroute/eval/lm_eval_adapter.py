"""lm-evaluation-harness model `megatron_selfroute`: this project's checkpoints, evaluated natively.

Any checkpoint `load_model` reads (consolidated, DeepSpeed save/tag directory, Hugging Face
GPT-2) is loaded as one `GPTModel` with dropless routing (no expert capacity: evaluation never
drops tokens, whatever the training capacity factor) and the checkpoint's own tokenizer.
Scoring follows lm-eval's `hf` model: context + continuation are left-truncated to the model's
context, right-padded into batches sorted by length, and scored with a log-softmax over the real
(unpadded) vocabulary; rolling log-likelihoods use lm-eval's disjoint windows with the
end-of-text token as prefix. Routing is per token, so padding never changes a request's score.

Use it through tools/eval_lm.py, or from Python after importing this module (which registers
it): `lm_eval.simple_evaluate(model="megatron_selfroute", model_args={"load": CKPT}, ...)`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from megatron_selfroute.checkpoint.consolidated import load_model
from megatron_selfroute.data.tokenizer import build_tokenizer
from megatron_selfroute.eval.generation import generate


@register_model("megatron_selfroute")
class MegatronSelfRouteLM(TemplateLM):
    """lm-eval `LM` over a megatron_selfroute checkpoint (`load=PATH`)."""

    def __init__(self, load: str, batch_size: int | str = 8, device: str = "cpu",
                 max_length: Optional[int] = None, max_gen_toks: int = 256, seed: int = 1234,
                 **kwargs) -> None:
        super().__init__()
        self.model, self.cfg = load_model(load, device)
        d = self.cfg.data
        self.tokenizer_impl = build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file,
                                              d.tokenizer_model, self.cfg.model.vocab_size)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = int(max_length or self.cfg.model.positions)
        self.max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_impl.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> list[int]:
        return self.tokenizer_impl.tokenize(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_impl.detokenize(tokens)

    @torch.no_grad()
    def _log_probs(self, inputs: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax [B, S, V] of right-padded inputs."""
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        logits = self.model(ids.to(self.device)).logits
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is greedy) per request."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            log_probs = self._log_probs(inputs)
            for (key, _, cont), inp, lp in zip(chunk, inputs, log_probs, strict=True):
                lp = lp[len(inp) - len(cont): len(inp)]
                target = torch.tensor(cont, dtype=torch.long)
                greedy = bool((lp.argmax(-1) == target).all())
                answer = (float(lp.gather(1, target[:, None]).sum()), greedy)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                out.append(answer)
                bar.update(1)
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over disjoint windows of the model's context."""
        windows, owners = [], []
        for idx, (string,) in enumerate(r.args for r in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores, strict=True):
            totals[idx] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _stop_check(self, until: list[str]):
        """True once the decoded new tokens contain a stop string."""
        return lambda tokens: any(s and s in self.tok_decode(tokens) for s in until)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, per the task's gen_kwargs) continuations cut at stop strings."""
        order = Collator([r.args for r in requests], sort_fn=lambda a: (-len(a[0]), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos = self.tok_decode([self.eot_token_id])
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kw = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = kw.pop("max_gen_toks")
            # do_sample without a temperature samples at 1, as transformers' generate does
            temperature = float(kw.get("temperature") or 1.0) if kw.get("do_sample") else 0.0
            keep = self.max_length - max_new
            if keep <= 0:
                raise ValueError(f"max_gen_toks {max_new} leaves no room in the model's "
                                 f"{self.max_length}-token context")
            prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]

            conts = generate(self.model, prompts, max_new, temperature=temperature,
                             top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p", 1.0)),
                             generator=self.generator, eos_id=self.eot_token_id,
                             stop=self._stop_check(until))
            for context, kwargs, cont in zip(contexts, all_kwargs, conts, strict=True):
                text = postprocess_generated_text(self.tok_decode(cont), until, None)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                out.append(text)
                bar.update(1)
        bar.close()
        return order.get_original(out)
