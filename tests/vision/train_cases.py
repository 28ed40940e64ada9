"""Training runs inside harness processes (pretrain_vit.main with a tiny ViT on tiny images)."""
from __future__ import annotations

from tests.distributed.harness import argv_cases, run_argv_cases

TINY = ["--img-size", "32", "--patch-size", "8", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--log-interval", "1", "--seed", "5", "--no-lr-scale",
        "--num-workers", "0"]


def run(argv: list[str]) -> dict:
    """Train; return per-iteration training losses and validation losses (exact floats)."""
    import pretrain_vit

    result = pretrain_vit.main(TINY + argv)
    return {"losses": {str(k): v for k, v in result.losses.items()},
            "valid": {str(k): v for k, v in result.valid_losses.items()},
            "exit": result.exit_reason, "iteration": result.iteration}


def run_layout(out_dir, world: int, argvs: list[list[str]], timeout: float = 600
               ) -> list[dict]:
    """Parent side: run each argv as one training run in a single `world`-process group."""
    return run_argv_cases(out_dir, world, "tests.vision.train_cases", "MSR_VIT_ARGV", argvs,
                          timeout)


# A case's argv travels in an environment variable (set by the test) named after it.
CASES = argv_cases("MSR_VIT_ARGV", run)
