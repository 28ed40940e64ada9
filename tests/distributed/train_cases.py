"""Training runs inside harness processes (pretrain_gpt.main with a tiny model)."""
from __future__ import annotations

import os

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--num-experts", "4", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "128", "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "1000",
        "--eval-iters", "1", "--split", "90,10,0", "--seed", "5"]


def run(argv: list[str]) -> dict:
    """Train; return per-iteration losses (as strings of floats: exact)."""
    import pretrain_gpt

    result = pretrain_gpt.main(TINY + argv)
    return {"losses": {str(k): v for k, v in result.losses.items()},
            "exit": result.exit_reason, "iteration": result.iteration}


def _case(argv_env: str):
    return lambda: run(os.environ[argv_env].split("\x1f"))


# A case's argv travels in an environment variable (set by the test) named after it.
CASES = {f"argv{i}": _case(f"MSR_ARGV{i}") for i in range(8)}
