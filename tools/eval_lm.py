#!/usr/bin/env python
r"""Zero-shot lm-eval of a checkpoint with the paper's Table 1 metrics.

    python tools/eval_lm.py --load CKPT [--tasks hellaswag lambada_openai ...]
        [--include-path DIR] [--limit N] [--batch-size B] [--output results.json]
        [--device cpu|cuda]

CKPT is anything `load_model` reads: a consolidated directory, a DeepSpeed `--save` or tag
directory (any layout), or a Hugging Face GPT-2 directory. Routing is dropless at evaluation.
Default tasks and metrics (Table 1): hellaswag acc_norm, lambada_openai perplexity, piqa acc,
wikitext word_perplexity, winogrande acc. The table is printed; `--output` writes JSON (lm-eval's
results + the summary) and a CSV beside it. Hub tasks need internet (or a filled HF cache);
`--include-path` adds local task YAMLs.

Reproducing the paper's Hugging Face GPT-2 row (machine with internet, ideally a GPU):

    python -c "from transformers import GPT2LMHeadModel as M; \
        M.from_pretrained('gpt2').save_pretrained('hf/gpt2')"
    python tools/checkpoint/convert.py --input hf/gpt2 --output ckpt/gpt2 --to consolidated
    python tools/eval_lm.py --load ckpt/gpt2 --device cuda --batch-size 32 \
        --output results/gpt2.json

and, as an independent cross-check with lm-eval's own model:

    lm_eval --model hf --model_args pretrained=gpt2 \
        --tasks hellaswag,lambada_openai,piqa,wikitext,winogrande
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_selfroute.checkpoint import CheckpointFormatError  # noqa: E402
from megatron_selfroute.cli import one_line_errors  # noqa: E402
from megatron_selfroute.eval.lm_eval_report import PAPER_TASKS  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--tasks", nargs="+", default=PAPER_TASKS,
                   help="lm-eval task names (space or comma separated)")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if < 1); for quick checks only")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--output", default=None, help="JSON file to write (CSV beside it)")
    p.add_argument("--label", default=None, help="model name in the table (default: --load)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    with one_line_errors(args.debug, (CheckpointFormatError, ValueError, OSError)):
        import math
        import os

        from megatron_selfroute.cli import check_device, check_output_file

        if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
            raise ValueError(f"--limit must be > 0 (a count, or a fraction below 1), got "
                             f"{args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.include_path is not None and not os.path.isdir(args.include_path):
            raise ValueError(f"--include-path {args.include_path}: not a directory")
        check_device(args.device)
        if args.output:
            check_output_file(args.output, "--output")
        from megatron_selfroute.eval.lm_eval_adapter import MegatronSelfRouteLM
        from megatron_selfroute.eval.lm_eval_report import (
            evaluate,
            format_table,
            summarize,
            write_outputs,
        )

        lm = MegatronSelfRouteLM(args.load, batch_size=args.batch_size, device=args.device)
        results = evaluate(lm, tasks, args.include_path, limit, args.num_fewshot,
                           args.batch_size)
        rows = summarize(results)
        print(format_table(rows, args.label or args.load))
        if args.output:
            csv_path = write_outputs(results, rows, args.output)
            print(f"wrote {args.output} and {csv_path}")


if __name__ == "__main__":
    main()
