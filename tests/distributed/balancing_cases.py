"""Issue 16's training runs inside harness processes: the Trainer driven step by step, so each
step's expert-bias update can be checked against that step's data-parallel token counts."""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from tests.distributed.harness import argv_cases
from tests.distributed.train_cases import TINY


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _biases(model) -> list[list[float]]:
    return [lay.router.load_bias.tolist() for lay in model.moe_layers
            if lay.router.load_bias is not None]


def run(argv: list[str]) -> dict:
    import pretrain_gpt
    from megatron_selfroute.arguments import parse_args
    from megatron_selfroute.parallel.layout import ParallelLayout
    from megatron_selfroute.training.loop import Trainer

    fault = None
    if "--test-nan-at" in argv:  # this case's own NaN (the env variable would hit every case)
        i = argv.index("--test-nan-at")
        nan_at = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
        fault = lambda loss, it: loss * float("nan") if it == nan_at else loss  # noqa: E731
    cfg, _ = parse_args(TINY + argv)
    trainer = Trainer.setup(cfg, pretrain_gpt.make_task(cfg), ParallelLayout.from_config(cfg),
                            fault_hook=fault)
    model = trainer.engine.module
    steps = []
    try:
        while trainer.state.iteration < trainer.cfg.train.train_iters:
            before = _biases(model)
            step = trainer.train_step()
            counts = trainer.routing.counts.clone()
            dist.all_reduce(counts, group=trainer.layout.dp_group)  # this step, every rank
            trainer.record(step)
            steps.append({"before": before, "after": _biases(model), "counts": counts.tolist(),
                          "skipped": step.skipped})
            trainer.log(step)
            reason = trainer.evaluate_save_exit()
            steps[-1]["pending_after_eval"] = trainer.bias.counts is not None
            if reason:
                break
        else:
            trainer.finish()
    finally:
        trainer.close()
    routers = [lay.router for lay in model.moe_layers]
    out = {"losses": {str(k): v for k, v in trainer.result.losses.items()},
           "valid": {str(k): v for k, v in trainer.result.valid_losses.items()},
           "iteration": trainer.result.iteration, "steps": steps, "bias": _biases(model),
           "bias_dtypes": sorted({str(r.load_bias.dtype) for r in routers
                                  if r.load_bias is not None}),
           "param_dtype": str(next(model.parameters()).dtype),
           "tables": [_digest(r.table) for r in routers if hasattr(r, "table")],
           "projs": [_digest(r.proj) for r in routers if hasattr(r, "proj")],
           "rank": dist.get_rank()}
    if os.environ.get("MSR_SAVE_TABLES") and hasattr(routers[0], "table"):
        out["table0"] = routers[0].table.tolist()
    return out


CASES = argv_cases("MSR_BAL", run)
