"""One training micro-batch (forward, loss bookkeeping, backward) of `pretrain_gpt.py`'s own
code path under `torch.cuda.set_sync_debug_mode("error")`: run as a script by
test_step_sync.py (its own process: the trainer starts torch.distributed). EP = 1, bf16, MoE
with 4 experts top-2, self router, grouped expert compute (the automatic choice on Hopper).
`--device cpu` runs the same path without the sync check (to test the script itself)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    import torch

    import pretrain_gpt
    from megatron_selfroute.arguments import parse_args
    from megatron_selfroute.parallel.layout import ParallelLayout
    from megatron_selfroute.training.loop import Trainer, _next_batch, _to_device

    cfg, _ = parse_args([
        "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096",
        "--num-experts", "4", "--moe-router-topk", "2", "--router-type", "self",
        "--moe-grouped-gemm", "grouped" if args.device == "cuda" else "auto", "--bf16",
        "--train-iters", "10", "--log-interval", "1000", "--eval-iters", "0", "--lr", "1e-4"])
    trainer = Trainer.setup(cfg, pretrain_gpt.make_task(cfg), ParallelLayout.from_config(cfg))
    try:
        for _ in range(2):  # warm-up: allocator, cuBLAS handles, DeepSpeed's first-step set-up
            trainer.record(trainer.train_step())
        engine = trainer.engine
        batch = _to_device(trainer.task, engine, _next_batch(trainer.loader, 3))
        acc = torch.zeros(3, dtype=torch.float64, device=engine.device)
        cuda = args.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.micro_batch(batch, 2, acc)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        print(f"micro-batch without host sync on {engine.device}: lm loss "
              f"{acc[0].item():.4f}, non-finite {int(acc[2].item())}")
    finally:
        trainer.close()
        from megatron_selfroute.parallel.groups import shutdown

        shutdown()  # the process group (NCCL on a GPU), destroyed before the interpreter exits


if __name__ == "__main__":
    main()
