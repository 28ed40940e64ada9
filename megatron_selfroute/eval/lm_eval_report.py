"""Run lm-eval on a checkpoint and report the paper's Table 1 metrics (table, JSON, CSV).

Table 1 reports, zero-shot: HellaSwag acc_norm, LAMBADA (OpenAI) perplexity, PIQA acc, WikiText
word perplexity and WinoGrande acc. Other tasks report every metric lm-eval computes.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Optional

PAPER_TASKS = ["hellaswag", "lambada_openai", "piqa", "wikitext", "winogrande"]
PAPER_METRICS = {"hellaswag": "acc_norm", "lambada_openai": "perplexity", "piqa": "acc",
                 "wikitext": "word_perplexity", "winogrande": "acc"}


def task_manager(tasks: list[str], include_path: Optional[str]):
    """lm-eval's TaskManager; only the include path is indexed when it defines every task
    (indexing lm-eval's thousands of built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def evaluate(lm: Any, tasks: list[str], include_path: Optional[str] = None,
             limit: Optional[float] = None, num_fewshot: int = 0, batch_size: int = 8,
             log_samples: bool = False, model_args: Optional[dict] = None) -> dict:
    """lm-eval's `simple_evaluate` with its default seeds; `lm` is an LM object, or a registered
    model name with `model_args` (e.g. "hf", {"pretrained": DIR})."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(missing)}")
    return simple_evaluate(model=lm, model_args=model_args, tasks=tasks,
                           num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                           task_manager=manager, log_samples=log_samples)


def summarize(results: dict) -> list[dict]:
    """Rows {task, metric, value, stderr}: the paper's metric per task, else every metric."""
    rows = []
    for task, metrics in results["results"].items():
        wanted = PAPER_METRICS.get(task)
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if (name.endswith("_stderr") or name == "sample_len"  # a document count
                    or not isinstance(value, (int, float))):
                continue
            if wanted is not None and name != wanted:
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            rows.append({"task": task, "metric": name, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def format_table(rows: list[dict], label: str) -> str:
    """One markdown row per model, one column per task (metric), as in the paper's Table 1."""
    head = ["Model"] + [f"{r['task']} ({r['metric']})" for r in rows]
    values = [label] + [f"{r['value']:.4f}" if r["metric"].startswith("acc") else
                        f"{r['value']:.2f}" for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      "| " + " | ".join(values) + " |"])


def write_outputs(results: dict, rows: list[dict], path: str) -> str:
    """JSON (lm-eval's results + the summary) at `path`, CSV of the summary beside it."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keep = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "config")
            if k in results}
    with open(path, "w") as f:
        json.dump({"summary": rows, **keep}, f, indent=1, default=handle_non_serializable)
    csv_path = os.path.splitext(path)[0] + ".csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "metric", "value", "stderr"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
