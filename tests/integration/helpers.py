"""Shared pieces of the checkpoint/eval tests: tiny configs, randomised models, tool runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_selfroute.checkpoint.consolidated import Checkpoint, save_consolidated
from megatron_selfroute.config import Config
from megatron_selfroute.models.gpt import GPTModel

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "shakespeare.txt"


def tiny_config(router: str | None = "self", vocab: int = 128, seq: int = 16,
                tokenizer: str = "NullTokenizer", **model_kw) -> Config:
    """2 blocks x hidden 32; MoE with 4 experts (top-2) in both blocks unless router is None."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, seq
    m.vocab_size = vocab
    for k, v in model_kw.items():
        setattr(m, k, v)
    cfg.data.tokenizer_type = tokenizer
    if router is not None:
        cfg.moe.num_experts, cfg.moe.router_type = 4, router
    return cfg


def random_model(cfg: Config, seed: int = 0, scale: float = 0.1) -> GPTModel:
    """A model whose every weight, bias, LayerNorm gain and router buffer is random (so every
    mapping is exercised), in eval mode."""
    model = GPTModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():  # not hash tables (ids)
                t.add_(torch.randn(t.shape, generator=gen) * scale)
    return model.eval()


def save_model(model: GPTModel, path: Path, iteration: int = 7) -> Path:
    save_consolidated(Checkpoint(model.state_dict(), model.cfg, {"iteration": iteration}),
                      str(path))
    return path


def run_tool(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run tools/<script> with this interpreter; returns the completed process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def corpus_lines(n: int, min_words: int = 6) -> list[str]:
    """The first n lines of the bundled corpus with at least min_words words."""
    out = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if len(line.split()) >= min_words:
                out.append(line)
                if len(out) == n:
                    break
    return out


def run_main(script: str, *args: str) -> tuple[int, str, str]:
    """Run tools/<script>'s main() in this process: (exit code, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"tool_{Path(script).stem}",
                                                  ROOT / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()
