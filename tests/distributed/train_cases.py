"""Training runs inside harness processes (pretrain_gpt.main with a tiny model)."""
from __future__ import annotations

from tests.distributed.harness import argv_cases, run_argv_cases

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--num-experts", "4", "--lr", "3e-3", "--log-interval", "1",
        "--eval-interval", "1000", "--eval-iters", "1", "--seed", "5"]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127"]


def real_data(prefix: str) -> list[str]:
    """Flags for the real GPT-2-tokenised corpus at `prefix`."""
    return ["--data-path", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--split", "95,5,0"]


def run(argv: list[str]) -> dict:
    """Train; return per-iteration losses (as strings of floats: exact)."""
    import pretrain_gpt

    result = pretrain_gpt.main(TINY + argv)
    return {"losses": {str(k): v for k, v in result.losses.items()},
            "grad_norms": {str(k): v for k, v in result.grad_norms.items()},
            "exit": result.exit_reason, "iteration": result.iteration}


def run_layout(out_dir, world: int, argvs: list[list[str]], timeout: float = 600
               ) -> list[dict]:
    """Parent side: run each argv as one training run in a single `world`-process group."""
    return run_argv_cases(out_dir, world, "tests.distributed.train_cases", "MSR_ARGV", argvs,
                          timeout)


# A case's argv travels in an environment variable (set by the test) named after it.
CASES = argv_cases("MSR_ARGV", run)
