#!/usr/bin/env python
r"""Router comparisons that say how much is noise: a seeded, paired sweep with 95% intervals.

    python tools/sweep.py --rows dense learned self --seeds 0 1 2 --scale small \
        --out-dir runs/sweep-small [--nproc 2] [--tasks T ...] [--dry-run]
    python tools/sweep.py --aggregate-only --runs DIR [DIR ...] --out-dir runs/table

Each (scale, row, seed) trains through the row script `examples/gpt2/<row>.sh` (so the same sweep
runs on this CPU, one GPU, or — with the rows trained by `examples/multinode/*` into the same
layout — a cluster), with `--seed S` appended: every row of a seed starts from the same values of
every parameter it shares with another row (initialisation is a pure function of (seed, parameter
name)) and reads the same batches in the same order (the sampler is a function of (seed, data,
batch)); each run's `summary.json` records a digest of both, and the table checks them. Then the
run is evaluated on the local lm-eval tasks (`tools/eval_lm.py`) and its routing analysed on the
held-out text (`tools/analyze_routing.py`). Held-out loss is evaluated at fixed token counts
(`--eval-tokens`: every that many training tokens). A run whose `done.json` exists is skipped, so a
re-run finishes what is missing and gives the same table; `--aggregate-only --runs` builds the
table from run directories made anywhere (e.g. `SCALE=paper` runs copied from a cluster).

Statistics do not overclaim: per row the mean over seeds and a 95% Student-t interval
(mean ± t_{0.975, n-1} · s / √n); per pair of rows the mean of the per-seed differences (paired
by seed) with its 95% t interval, called a difference only where the interval excludes zero.
Outputs in OUT/table/: table.md, table.csv, table.json, and PNG figures in the paper's form with
bands over seeds (per-layer normalised entropy, layer × expert fractions, per-layer max expert
fraction, validation loss against tokens). Phase times are printed. Errors are one line.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from itertools import combinations
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The paper's Table 1 and utilisation (arXiv 2604.00421; ../shared/paper facts), for reference.
PAPER_TABLE1 = {
    "dense": {"hellaswag": 33.3, "lambada_ppl": 31.6, "piqa": 63.0, "wikitext_ppl": 33.6,
              "winogrande": 51.7},
    "learned": {"hellaswag": 38.5, "lambada_ppl": 19.3, "piqa": 65.6, "wikitext_ppl": 26.7,
                "winogrande": 53.8, "mean_normalized_entropy": 0.617, "mean_max_fraction": 0.453},
    "random": {"hellaswag": 32.8, "lambada_ppl": 35.0, "piqa": 59.6, "wikitext_ppl": 34.6,
               "winogrande": 52.5},
    "fixed_random": {"hellaswag": 38.9, "lambada_ppl": 20.1, "piqa": 65.9, "wikitext_ppl": 27.0,
                     "winogrande": 54.1, "mean_normalized_entropy": 0.648,
                     "mean_max_fraction": 0.449},
    "self": {"hellaswag": 39.0, "lambada_ppl": 18.9, "piqa": 67.4, "wikitext_ppl": 27.4,
             "winogrande": 53.8, "mean_normalized_entropy": 0.724, "mean_max_fraction": 0.377},
}
# Metrics where lower is better (the table marks the direction).
LOWER_BETTER = ("valid_loss", "valid_ppl", "mean_max_fraction", "mean_dead_experts",
                "peak_memory_mb", "step_time_ms")


# ---- statistics ------------------------------------------------------------------------------

def t_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample sd, n and the half-width of the Student-t interval (None when n < 2)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return {"mean": mean, "n": n, "sd": None, "half_width": None, "low": None, "high": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "n": n, "sd": sd, "half_width": half, "low": mean - half,
            "high": mean + half}


def paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict]:
    """Per-seed differences a - b over the seeds both have; their t interval and whether it
    excludes zero (None without a common seed)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    out = t_interval([a[s] - b[s] for s in seeds])
    out["seeds"] = seeds
    out["differs"] = (out["low"] is not None and (out["low"] > 0 or out["high"] < 0))
    return out


# ---- one run ---------------------------------------------------------------------------------

def run_dir(out_dir: str, scale: str, seed: int, row: str) -> str:
    return os.path.join(out_dir, scale, f"seed{seed}", row)


FAMILY_DIRS = {"gpt": "gpt2", "vit": "deit"}


def row_script(family: str, row: str) -> str:
    """examples/gpt2/<row>.sh (language models) or examples/deit/<row>.sh (DeiT)."""
    return os.path.join(ROOT, "examples", FAMILY_DIRS[family], f"{row}.sh")


def _env(args, scale: str, seed_dir: str, row: str = "") -> dict:
    env = dict(os.environ, SCALE=scale, OUT_DIR=seed_dir, GPUS_PER_NODE=str(args.nproc),
               PYTHON=args.python, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.family == "vit":  # examples/deit/settings.sh's knobs
        env.update(OUT=os.path.join(seed_dir, row), NGPUS=str(args.nproc),
                   DATA=args.image_root or "")
        if args.device == "cpu":
            env.setdefault("BF16", "0")
    elif args.nproc > 1:
        env.setdefault("LAUNCHER", "torchrun")
    if args.ep:
        env["EP"] = str(args.ep)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def commands(args, scale: str, row: str, seed: int) -> list[tuple[str, list[str]]]:
    """The (phase, command) list of one run."""
    d = run_dir(args.out_dir, scale, seed, row)
    ckpt = os.path.join(d, "checkpoints")
    # the gpt2 row scripts write OUT_DIR/<row>/summary.json (--run-summary) = d/summary.json
    train = ["bash", row_script(args.family, row), "--seed", str(seed)]
    if args.family == "vit":
        train += ["--run-summary", os.path.join(d, "summary.json")]
    if args.eval_tokens:
        train += ["--eval-every-tokens", str(args.eval_tokens)]
    train += shlex.split(args.train_args)
    out = [("train", train)]
    if args.tasks:
        out.append(("eval", [args.python, os.path.join(ROOT, "tools", "eval_lm.py"), "--load",
                             ckpt, "--tasks", *args.tasks, "--output",
                             os.path.join(d, "eval.json"), "--label", row, "--batch-size",
                             str(args.eval_batch), "--device", args.device]
                    + (["--include-path", args.tasks_dir] if args.tasks_dir else [])
                    + (["--limit", str(args.eval_limit)] if args.eval_limit else [])))
    if args.family == "vit":
        args.routing_data = args.routing_data or args.image_root
    if row != "dense" and args.routing_data:
        out.append(("routing", [args.python, os.path.join(ROOT, "tools", "analyze_routing.py"),
                                "--load", ckpt, "--data-path", args.routing_data, "--tokens",
                                str(args.routing_tokens), "--labels", row, "--output-dir",
                                os.path.join(d, "routing"), "--no-progress", "--device",
                                args.device]))
    return out


def run_one(args, scale: str, row: str, seed: int) -> Optional[dict]:
    """Train, evaluate and analyse one run unless done; returns its phase times."""
    d = run_dir(args.out_dir, scale, seed, row)
    done = os.path.join(d, "done.json")
    cmds = commands(args, scale, row, seed)
    if args.dry_run:
        env = _env(args, scale, os.path.dirname(d), row)
        names = (("OUT", "NGPUS", "DATA", "BF16", "EP") if args.family == "vit" else
                 ("SCALE", "OUT_DIR", "GPUS_PER_NODE", "LAUNCHER", "EP"))
        knobs = " ".join(f"{k}={shlex.quote(env[k])}" for k in names if k in env)
        for _, cmd in cmds:
            print(f"{knobs} {shlex.join(cmd)}" if cmd[0] == "bash" else shlex.join(cmd))
        return None
    if os.path.isfile(done):
        print(f"[sweep] {scale}/{row}/seed{seed}: done, skipped")
        return None
    times = {}
    env = _env(args, scale, os.path.dirname(d), row)
    for phase, cmd in cmds:
        t0 = time.time()
        print(f"[sweep] {scale}/{row}/seed{seed}: {phase}", flush=True)
        log = os.path.join(d, f"{phase}.log")
        os.makedirs(d, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            with open(log) as f:
                tail = f.read().strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"{scale}/{row}/seed{seed} {phase} failed (exit "
                               f"{proc.returncode}; {log}): {tail[0]}")
        times[phase] = time.time() - t0
    with open(done + ".tmp", "w") as f:
        json.dump({"scale": scale, "row": row, "seed": seed, "phase_seconds": times}, f)
    os.replace(done + ".tmp", done)
    return times


# ---- aggregation -----------------------------------------------------------------------------

def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def load_run(d: str) -> Optional[dict]:
    """One finished run's record (metrics by name) from its directory, or None."""
    summary = _read(os.path.join(d, "summary.json"))
    if not summary or not summary.get("complete"):
        return None
    done = _read(os.path.join(d, "done.json")) or {}
    valid = {int(k): v for k, v in summary["valid_loss"].items()}
    last = max(valid) if valid else None
    m: dict[str, float] = {}
    if last is not None:
        m["valid_loss"] = valid[last]
        m["valid_ppl"] = math.exp(min(valid[last], 50))
    for key in ("tokens_per_sec", "step_time_ms", "peak_memory_mb"):
        if summary.get(key) is not None:
            m[key] = summary[key]
    vm = summary.get("valid_metrics", {}).get(str(last), {}) if last is not None else {}
    for key, value in vm.items():  # DeiT's top-1 / top-5 (and the EMA's)
        if "top1" in key or "top5" in key:
            m["valid_" + key.replace(" ", "_")] = value
    ev = _read(os.path.join(d, "eval.json"))
    for r in (ev or {}).get("summary", []):
        m[f"{r['task']}/{r['metric']}"] = r["value"]
    routing = _read(os.path.join(d, "routing", "routing.json"))
    layers = {}
    if routing:
        r = routing[0]
        for key in ("mean_normalized_entropy", "mean_max_fraction", "mean_dead_experts"):
            m[key] = r[key]
        for key, value in (r.get("cross_layer") or {}).items():
            if key.startswith("mean_") and value == value:  # not NaN
                m[f"cross_layer_{key[5:]}"] = value
        layers = {"normalized_entropy": r["normalized_entropy"],
                  "max_fraction": r["max_fraction"], "fractions": r["fractions"],
                  "blocks": r["blocks"]}
    return {"dir": d, "scale": done.get("scale") or summary.get("shape"),
            "row": done.get("row") or summary.get("row"),
            "seed": summary["seed"], "router": summary["router"], "metrics": m,
            "layers": layers, "valid_curve": {summary["tokens_per_iteration"] * it: v
                                              for it, v in sorted(valid.items())},
            "init_digest": summary.get("init_digest", {}),
            "data_digest": summary.get("data_digest"),
            "phase_seconds": done.get("phase_seconds", {})}


def find_runs(dirs: list[str]) -> list[dict]:
    """Every finished run under `dirs` (a run directory holds summary.json)."""
    runs = []
    for top in dirs:
        for path in sorted(glob.glob(os.path.join(top, "**", "summary.json"), recursive=True)):
            rec = load_run(os.path.dirname(path))
            if rec is not None:
                rec["scale"] = rec["scale"] or "unknown"
                rec["row"] = rec["row"] or os.path.basename(os.path.dirname(path))
                runs.append(rec)
    return runs


def check_pairing(runs: list[dict]) -> dict:
    """Per (scale, seed): the rows saw the same batches, and every parameter two rows share
    started from the same values (digests from the runs' summaries)."""
    out = {}
    by_seed: dict[tuple, list[dict]] = {}
    for r in runs:
        by_seed.setdefault((r["scale"], r["seed"]), []).append(r)
    for (scale, seed), group in sorted(by_seed.items()):
        data = {r["data_digest"] for r in group}
        shared_ok, compared = True, 0
        for a, b in combinations(group, 2):
            for name in set(a["init_digest"]) & set(b["init_digest"]):
                compared += 1
                shared_ok &= a["init_digest"][name] == b["init_digest"][name]
        out[f"{scale}/seed{seed}"] = {"rows": sorted(r["row"] for r in group),
                                      "same_batches": len(data) == 1,
                                      "same_shared_init": shared_ok,
                                      "shared_tensors_compared": compared}
    return out


def aggregate(runs: list[dict]) -> dict:
    """Per (scale, row) intervals and per pair paired differences, for every metric."""
    table: dict = {"rows": [], "pairs": [], "pairing": check_pairing(runs),
                   "paper": PAPER_TABLE1}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scale"], r["row"]), []).append(r)
    for (scale, row), group in sorted(groups.items()):
        metrics = sorted({k for r in group for k in r["metrics"]})
        entry = {"scale": scale, "row": row, "router": group[0]["router"],
                 "seeds": sorted(r["seed"] for r in group), "metrics": {}}
        for key in metrics:
            vals = [r["metrics"][key] for r in group if key in r["metrics"]]
            entry["metrics"][key] = t_interval(vals)
        table["rows"].append(entry)
    for scale in sorted({s for s, _ in groups}):
        rows = sorted(row for s, row in groups if s == scale)
        for a, b in combinations(rows, 2):
            ga, gb = groups[(scale, a)], groups[(scale, b)]
            keys = sorted({k for r in ga for k in r["metrics"]}
                          & {k for r in gb for k in r["metrics"]})
            diffs = {}
            for key in keys:
                d = paired({r["seed"]: r["metrics"][key] for r in ga if key in r["metrics"]},
                           {r["seed"]: r["metrics"][key] for r in gb if key in r["metrics"]})
                if d is not None:
                    diffs[key] = d
            table["pairs"].append({"scale": scale, "a": a, "b": b, "metrics": diffs})
    return table


def _fmt(stat: dict) -> str:
    if stat["half_width"] is None:
        return f"{stat['mean']:.4g}"
    return f"{stat['mean']:.4g} ± {stat['half_width']:.2g}"


def metric_groups(table: dict) -> list[tuple[str, list[str]]]:
    """The table's column groups: quality and utilisation, cross-layer routing, speed."""
    keys = sorted({k for e in table["rows"] for k in e["metrics"]})
    speed = [k for k in ("tokens_per_sec", "step_time_ms", "peak_memory_mb") if k in keys]
    cross = [k for k in keys if k.startswith("cross_layer_")]
    first = [k for k in ("valid_loss", "valid_ppl") if k in keys]
    util = [k for k in ("mean_normalized_entropy", "mean_max_fraction", "mean_dead_experts")
            if k in keys]
    tasks = [k for k in keys if k not in first + util + cross + speed]
    return [("held-out loss, tasks and utilisation", first + tasks + util),
            ("cross-layer routing (means over layer pairs)", cross),
            ("speed and memory (rank 0; the run's layout)", speed)]


def _arrow(k: str) -> str:
    if k in LOWER_BETTER or k.endswith("perplexity"):
        return " ↓"
    return " ↑" if k in ("tokens_per_sec",) or k.endswith(("/acc", "/acc_norm")) else ""


def to_markdown(table: dict) -> str:
    lines = []
    for title, keys in metric_groups(table):
        if not keys:
            continue
        lines += [f"**{title}** — per row: mean ± 95% t half-width over the seeds", "",
                  "| scale | row | seeds | " + " | ".join(k + _arrow(k) for k in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for e in table["rows"]:
            cells = [_fmt(e["metrics"][k]) if k in e["metrics"] else "–" for k in keys]
            lines.append(f"| {e['scale']} | {e['row']} | {len(e['seeds'])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    for title, keys in metric_groups(table):
        if not keys or not table["pairs"]:
            continue
        lines += [f"**Paired differences, {title}**: mean of the per-seed differences (a − b) "
                  "[95% t interval]; **bold** = the interval excludes zero (a difference); "
                  "otherwise not distinguishable from seed noise", "",
                  "| scale | a − b | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for p in table["pairs"]:
            cells = []
            for k in keys:
                d = p["metrics"].get(k)
                if d is None or d["half_width"] is None:
                    cells.append("–" if d is None else f"{d['mean']:+.3g} (n=1)")
                    continue
                text = f"{d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"
                cells.append(f"**{text}**" if d["differs"] else text)
            lines.append(f"| {p['scale']} | {p['a']} − {p['b']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Pairing checks (rows of one seed: same batches, same initial values of every "
              "shared parameter):", ""]
    for key, c in table["pairing"].items():
        lines.append(f"- {key}: rows {', '.join(c['rows'])}; same batches "
                     f"{c['same_batches']}; same shared init {c['same_shared_init']} "
                     f"({c['shared_tensors_compared']} tensor pairs compared)")
    for scale, split in table.get("flop_split", {}).items():
        lines.append(f"- FLOP split at {scale} (forward, per token, an MoE row): attention "
                     f"{split['attention']:.0%}, MLP/MoE {split['mlp']:.0%}, output layer "
                     f"{split['output_layer']:.0%} of {split['total_per_token'] / 1e6:.2f} MFLOP")
    lines += ["", "The paper's Table 1 (GPT-2 small, OpenWebText, 8 experts top-2; for reference, "
              "not comparable in scale):", "",
              "| row | HellaSwag | LAMBADA ppl ↓ | PIQA | WikiText ppl ↓ | WinoGrande | "
              "mean H/log N | mean max-expert fraction ↓ |", "|---|---|---|---|---|---|---|---|"]
    for row, v in PAPER_TABLE1.items():
        lines.append(f"| {row} | {v['hellaswag']} | {v['lambada_ppl']} | {v['piqa']} | "
                     f"{v['wikitext_ppl']} | {v['winogrande']} | "
                     f"{v.get('mean_normalized_entropy', '–')} | "
                     f"{v.get('mean_max_fraction', '–')} |")
    return "\n".join(lines) + "\n"


def write_csv(table: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "scale", "row", "metric", "mean", "low", "high", "n", "differs"])
        for e in table["rows"]:
            for k, s in e["metrics"].items():
                w.writerow(["row", e["scale"], e["row"], k, s["mean"], s["low"], s["high"],
                            s["n"], ""])
        for p in table["pairs"]:
            for k, s in p["metrics"].items():
                w.writerow(["pair", p["scale"], f"{p['a']} - {p['b']}", k, s["mean"], s["low"],
                            s["high"], s["n"], s["differs"]])


def plot(runs: list[dict], out_dir: str) -> list[str]:
    """The paper's figures with bands over seeds (mean ± 95% t half-width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scale"], r["row"]), []).append(r)
    paths = []

    def band(ax, x, series, label):
        arr = np.asarray(series, dtype=float)
        mean = arr.mean(0)
        ax.plot(x, mean, marker="o", ms=3, label=f"{label} (n={len(arr)})")
        if len(arr) > 1:
            half = [t_interval(list(col))["half_width"] for col in arr.T]
            ax.fill_between(x, mean - half, mean + half, alpha=0.2)

    for key, ylabel, name in (("normalized_entropy", "normalised entropy H / log N",
                               "fig2_entropy.png"),
                              ("max_fraction", "max expert fraction", "fig4_max_fraction.png")):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for (scale, row), group in sorted(groups.items()):
            series = [g["layers"][key] for g in group if g["layers"]]
            if series:
                band(ax, group[0]["layers"]["blocks"], series, f"{scale}/{row}")
        ax.set_xlabel("block (MoE layer)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    moe = [(k, g) for k, g in sorted(groups.items()) if any(x["layers"] for x in g)]
    if moe:
        fig, axes = plt.subplots(1, len(moe), figsize=(2.6 * len(moe) + 1, 3.2), squeeze=False)
        for ax, ((_, row), group) in zip(axes[0], moe, strict=True):
            frac = np.mean([g["layers"]["fractions"] for g in group if g["layers"]], axis=0)
            im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=max(frac.max(), 0.01))
            ax.set_title(f"{row} (mean of {len(group)})", fontsize="small")
            ax.set_xlabel("expert")
            ax.set_ylabel("block")
        fig.colorbar(im, ax=axes[0].tolist(), label="fraction")
        paths.append(os.path.join(out_dir, "fig3_expert_fractions.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (scale, row), group in sorted(groups.items()):
        curves = [g["valid_curve"] for g in group if g["valid_curve"]]
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if common:
            band(ax, common, [[c[t] for t in common] for c in curves], f"{scale}/{row}")
    ax.set_xlabel("training tokens (ViT: patches + class token per image)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "valid_loss.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def flop_split(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Forward FLOPs per token by part, per scale (from a run's config): how much of the model
    the MoE layers are."""
    from megatron_selfroute.config import Config
    from megatron_selfroute.models.gpt import gpt_flops_breakdown

    out = {}
    for r in runs:
        if r["scale"] in out or r["router"] == "dense":
            continue
        summary = _read(os.path.join(r["dir"], "summary.json"))
        cfg = Config.from_dict(summary["config"])
        if cfg.model.vocab_size is None:  # a ViT: no output layer over a vocabulary
            continue
        parts = gpt_flops_breakdown(cfg)
        total = sum(parts.values())
        out[r["scale"]] = {k: v / total for k, v in parts.items()} | {"total_per_token": total}
    return out


def write_table(runs: list[dict], out_dir: str) -> tuple[dict, list[str]]:
    if not runs:
        raise ValueError("no finished runs (summary.json with complete: true) to aggregate")
    os.makedirs(out_dir, exist_ok=True)
    table = aggregate(runs)
    table["flop_split"] = flop_split(runs)
    table["runs"] = [{k: r[k] for k in ("dir", "scale", "row", "seed", "router", "metrics",
                                         "phase_seconds")} for r in runs]
    paths = [os.path.join(out_dir, n) for n in ("table.md", "table.csv", "table.json")]
    with open(paths[0], "w") as f:
        f.write(to_markdown(table))
    write_csv(table, paths[1])
    with open(paths[2], "w") as f:
        json.dump(table, f, indent=1)
    return table, paths + plot(runs, out_dir)


# ---- command line ----------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["dense", "learned", "self", "fixed_random",
                                                  "random"], help="row scripts (examples/gpt2)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--scale", nargs="+", default=["small"],
                   help="SCALE values (sizes; for --family vit a label of the run's flags)")
    p.add_argument("--family", choices=sorted(FAMILY_DIRS), default="gpt",
                   help="gpt: examples/gpt2 rows; vit: examples/deit rows (Table 2)")
    p.add_argument("--image-root", default=None,
                   help="vit: the image set (DATA of examples/deit; also routed)")
    p.add_argument("--out-dir", required=True, help="runs go to OUT/<scale>/seed<S>/<row>/")
    p.add_argument("--table-dir", default=None, help="table and figures [OUT/table]")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (GPUS_PER_NODE)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (EP)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="held-out evaluation every this many training tokens")
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks per run")
    p.add_argument("--tasks-dir", default=None, help="extra task YAMLs (--include-path)")
    p.add_argument("--eval-limit", type=float, default=None)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--device", default="cpu", help="device of evaluation and routing analysis")
    p.add_argument("--routing-data", default=None, help="held-out prefix for analyze_routing")
    p.add_argument("--routing-tokens", type=int, default=65536)
    p.add_argument("--train-args", default="", help="extra pretrain_gpt.py flags (one string)")
    p.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for the row scripts")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dry-run", action="store_true", help="print every command")
    p.add_argument("--aggregate-only", action="store_true", help="only build the table")
    p.add_argument("--runs", nargs="*", default=None,
                   help="run directories to aggregate (default: --out-dir)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    for row in args.rows:
        if not os.path.isfile(row_script(args.family, row)):
            p.error(f"--rows: no row script examples/{FAMILY_DIRS[args.family]}/{row}.sh")
    if args.family == "vit" and not args.image_root and not args.aggregate_only:
        p.error("--family vit needs --image-root (an ImageFolder root or a Hugging Face dataset)")
    if args.family == "vit" and (args.tasks or args.eval_tokens):
        p.error("--tasks and --eval-tokens are for language models (--family gpt)")
    if args.nproc < 1:
        p.error(f"--nproc {args.nproc} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    from megatron_selfroute.cli import one_line_errors

    args = parse_args(argv)
    with one_line_errors(args.debug, (ValueError, OSError, RuntimeError)):
        total = {}
        if not args.aggregate_only:
            n = len(args.scale) * len(args.rows) * len(args.seeds)
            i, t0 = 0, time.time()
            for scale in args.scale:
                for seed in args.seeds:  # seeds outermost: a partial sweep is still paired
                    for row in args.rows:
                        i += 1
                        times = run_one(args, scale, row, seed)
                        for k, v in (times or {}).items():
                            total[k] = total.get(k, 0.0) + v
                        if times:
                            left = (time.time() - t0) / i * (n - i)
                            print(f"[sweep] {i}/{n} runs, {time.time() - t0:.0f} s, ETA "
                                  f"{left:.0f} s; phases {json.dumps(times)}", flush=True)
            if args.dry_run:
                return
        runs = find_runs(args.runs or [args.out_dir])
        if not args.aggregate_only:  # this sweep's rows and scales (others share the folder)
            runs = [r for r in runs if r["row"] in args.rows and r["scale"] in args.scale]
        table_dir = args.table_dir or os.path.join(args.out_dir, "table")
        table, paths = write_table(runs, table_dir)
        print(to_markdown(table))
        if total:
            print("phase times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in total.items()))
        print(f"wrote {len(paths)} files to {table_dir}")


if __name__ == "__main__":
    main()
