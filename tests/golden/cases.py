"""Golden training runs inside harness processes: argv[0] names the script (gpt or vit)."""
from __future__ import annotations

import importlib

import torch

from tests.distributed.harness import argv_cases


def run(argv: list[str]) -> dict:
    """Train with pretrain_gpt.py or pretrain_vit.py; return the exact losses."""
    torch.set_num_threads(1)
    script, *rest = argv
    module = importlib.import_module({"gpt": "pretrain_gpt", "vit": "pretrain_vit"}[script])
    result = module.main(rest)
    return {"losses": {str(k): v for k, v in result.losses.items()},
            "valid": {str(k): v for k, v in result.valid_losses.items()},
            "iteration": result.iteration, "exit": result.exit_reason}


CASES = argv_cases("MSR_GOLDEN_ARGV", run)
