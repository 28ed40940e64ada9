"""Expert utilisation of MoE checkpoints over a token stream, as the paper measures it.

Each checkpoint reads the first N tokens of a Megatron dataset (documents in file order,
concatenated, cut into windows of the model's sequence length; the last window may be shorter)
with dropless routing; a ViT checkpoint reads the validation images of an image root instead
(N tokens = patches + class token per image). Per MoE layer it counts routed token-slots per
expert (k per token) and reports expert fractions, normalised entropy H / log E (1 = uniform)
and the maximum expert fraction and dead experts (`moe/stats.py`), then their means over
layers; and for every pair of MoE layers the cross-layer metrics of `moe/cross_layer.py`
(identity agreement against chance, top-k overlap, NMI, and for language models their token-id
shuffled baselines). Outputs: JSON, CSV and PNG figures.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from megatron_selfroute.data.indexed_dataset import IndexedDataset
from megatron_selfroute.models.gpt import GPTModel
from megatron_selfroute.moe.cross_layer import CrossLayerAccumulator
from megatron_selfroute.moe.stats import expert_fractions, routing_metrics


def token_windows(prefix: str, num_tokens: int, window: int) -> Iterator[np.ndarray]:
    """The first `num_tokens` tokens of the dataset in windows of `window` tokens; the dataset
    is opened and checked at once (not at the first window), so a bad --data-path fails before
    any progress bar starts."""
    if not IndexedDataset.exists(prefix):
        raise ValueError(f"--data-path {prefix}: no token dataset ({prefix}.idx/.bin not found)")
    data = IndexedDataset(prefix)
    available = int(data.sequence_lengths.sum())
    if available < num_tokens:
        raise ValueError(f"--data-path {prefix} holds only {available} tokens, fewer than "
                         f"--tokens {num_tokens}")
    return _windows(data, num_tokens, window)


def _windows(data: IndexedDataset, num_tokens: int, window: int) -> Iterator[np.ndarray]:
    pending, left = np.empty(0, dtype=np.int64), num_tokens
    for i in range(len(data)):
        if left == 0:
            break
        tokens = np.asarray(data[i][:left], dtype=np.int64)
        left -= tokens.size
        pending = np.concatenate([pending, tokens])
        start = 0
        while pending.size - start >= window:
            yield pending[start:start + window]
            start += window
        pending = pending[start:]
    if pending.size:
        yield pending


@torch.no_grad()
def count_routes(model: GPTModel, prefix: str, num_tokens: int, batch_size: int = 8,
                 progress: bool = True, cross: Optional[CrossLayerAccumulator] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed token-slots per (MoE layer, expert) [L, E] and dropped routes [L] (int64) of an
    MoE model over the first `num_tokens` tokens of the dataset at `prefix`; `cross`, if given,
    receives every token's expert ids and token id."""
    device = next(model.parameters()).device
    window = model.cfg.model.seq_length
    counts = dropped = None
    windows = token_windows(prefix, num_tokens, window)  # checked before the bar starts
    bar = tqdm(total=num_tokens, unit="tok", disable=not progress, desc="routing")
    batch: list[np.ndarray] = []
    seen = 0

    def run(rows: list[np.ndarray]) -> None:
        nonlocal counts, dropped, seen
        ids = torch.from_numpy(np.stack(rows)).to(device)
        if int(ids.max()) >= model.vocab_size:
            raise ValueError(f"--data-path {prefix}: token id {int(ids.max())} is outside the "
                             f"model's vocabulary of {model.vocab_size} (another tokenizer?)")
        b, s = ids.shape
        index = seen + torch.arange(b * s, device=device).view(b, s)  # global token positions
        model(ids, token_index=index)
        if cross is not None:
            cross.add(model.routing_ids(), ids.reshape(-1))
        c, d = (t.to("cpu", torch.int64) for t in model.routing_counts())
        counts, dropped = (c, d) if counts is None else (counts + c, dropped + d)
        seen += ids.numel()
        bar.update(ids.numel())

    for rows in windows:
        if batch and rows.size != batch[0].size:  # the short last window goes alone
            run(batch)
            batch = []
        batch.append(rows)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    bar.close()
    return counts, dropped


@torch.no_grad()
def count_routes_images(model: torch.nn.Module, root: str, num_tokens: int,
                        batch_size: int = 8, progress: bool = True,
                        cross: Optional[CrossLayerAccumulator] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same counts for a ViT: the validation images of the ImageFolder root (or Hugging Face
    dataset) `root`, in file order, through DeiT's evaluation transform, until `num_tokens`
    tokens (patches + class token per image) were routed."""
    from megatron_selfroute.data import vision

    hf = not os.path.isdir(root)
    source = vision.open_images(None if hf else root, root if hf else None, "val")
    transform = vision.eval_transform(model.vit.img_size)
    per_image = model.vit.num_tokens
    n_images = min(len(source), -(-num_tokens // per_image))
    device = next(model.parameters()).device
    counts = dropped = None
    bar = tqdm(total=n_images * per_image, unit="tok", disable=not progress, desc="routing")
    for start in range(0, n_images, batch_size):
        idx = range(start, min(start + batch_size, n_images))
        images = torch.stack([transform(source.load(i)[0]) for i in idx]).to(device)
        index = (torch.arange(len(idx), device=device).view(-1, 1) + start) * per_image
        model(images, token_index=index + torch.arange(per_image, device=device))
        if cross is not None:
            cross.add(model.routing_ids())
        c, d = (t.to("cpu", torch.int64) for t in model.routing_counts())
        counts, dropped = (c, d) if counts is None else (counts + c, dropped + d)
        bar.update(len(idx) * per_image)
    bar.close()
    return counts, dropped


def summarize(label: str, path: str, model: GPTModel, counts: torch.Tensor,
              dropped: torch.Tensor, cross: Optional[dict] = None) -> dict:
    """Per-layer metrics, fractions and their means for one checkpoint (+ the cross-layer
    matrices of `CrossLayerAccumulator.result`)."""
    metrics = routing_metrics(counts, dropped)
    blocks = [i for i, v in enumerate(model.pattern) if v]
    n = len(blocks)
    tokens = int(counts[0].sum()) // model.cfg.moe.moe_router_topk
    return {"label": label, "path": path, "tokens": tokens, "router": model.cfg.moe.router_type,
            "blocks": blocks,
            "counts": counts.tolist(), "fractions": expert_fractions(counts).tolist(), **metrics,
            "mean_normalized_entropy": sum(metrics["normalized_entropy"]) / n,
            "mean_max_fraction": sum(metrics["max_fraction"]) / n,
            "mean_dead_experts": sum(metrics["dead_experts"]) / n,
            "cross_layer": cross}


def write_outputs(results: list[dict], out_dir: str) -> list[str]:
    """routing.json, routing.csv and PNG figures in `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "routing.json"), os.path.join(out_dir, "routing.csv")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    width = max(len(r["fractions"][0]) for r in results)
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "moe_layer", "block", "normalized_entropy", "max_fraction",
                    "dropped_fraction", "dead_experts"] + [f"expert_{e}" for e in range(width)])
        for r in results:
            for i, block in enumerate(r["blocks"]):
                w.writerow([r["label"], i, block, r["normalized_entropy"][i],
                            r["max_fraction"][i], r["dropped_fraction"][i],
                            r["dead_experts"][i]] + r["fractions"][i])
    crossed = [r for r in results if r.get("cross_layer")]
    if crossed:
        paths.append(os.path.join(out_dir, "cross_layer.csv"))
        with open(paths[-1], "w", newline="") as f:
            w = csv.writer(f)
            keys = [k for k in CROSS_KEYS if k in crossed[0]["cross_layer"]]
            w.writerow(["label", "block_l", "block_m"] + keys)
            for r in crossed:
                c, blocks = r["cross_layer"], r["blocks"]
                for i, bl in enumerate(blocks):
                    for j, bm in enumerate(blocks):
                        if i != j:
                            w.writerow([r["label"], bl, bm] + [c[k][i][j] for k in keys
                                                               if k in c])
    return paths + plot(results, out_dir) + plot_cross_layer(crossed, out_dir)


CROSS_KEYS = ("identity_agreement", "chance_agreement", "shuffled_identity_agreement",
              "topk_overlap", "nmi", "shuffled_nmi")


def plot_cross_layer(results: list[dict], out_dir: str) -> list[str]:
    """Per checkpoint, one PNG with a layer x layer heat map per cross-layer metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for i, r in enumerate(results):
        c, blocks = r["cross_layer"], r["blocks"]
        keys = [k for k in CROSS_KEYS if k in c]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            im = ax.imshow(np.asarray(c[key]), vmin=0, vmax=1, cmap="magma")
            ax.set_title(key.replace("_", " "), fontsize="small")
            ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize="x-small")
            ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize="x-small")
            ax.set_xlabel("block m")
            ax.set_ylabel("block l")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(f"{r['label']}: cross-layer routing", fontsize="small")
        paths.append(os.path.join(out_dir, f"cross_layer_{i}_{_safe(r['label'])}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot(results: list[dict], out_dir: str) -> list[str]:
    """Per-layer normalised entropy and max fraction (a line per checkpoint); a layer x expert
    heat map of fractions per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, name in (("normalized_entropy", "normalised entropy H / log E",
                               "entropy.png"),
                              ("max_fraction", "max expert fraction", "max_fraction.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in results:
            ax.plot(r["blocks"], r[key], marker="o", label=r["label"])
        ax.set_xticks(sorted({b for r in results for b in r["blocks"]}))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("block (MoE layers)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for i, r in enumerate(results):
        frac = np.asarray(r["fractions"])
        fig, ax = plt.subplots(figsize=(1 + 0.4 * frac.shape[1], 1 + 0.35 * frac.shape[0]))
        im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(frac.shape[1]))
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_yticks(range(len(r["blocks"])), [str(b) for b in r["blocks"]])
        ax.set_title(r["label"], fontsize="small")
        fig.colorbar(im, ax=ax, label="fraction")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"heatmap_{i}_{_safe(r['label'])}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]


def format_averages(results: list[dict]) -> str:
    """A table of the per-checkpoint means over MoE layers."""
    lines = ["| checkpoint | router | tokens | mean H/log E | mean max-expert fraction | "
             "mean dead experts | agreement (chance, id-shuffled) | NMI (id-shuffled) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("cross_layer") or {}
        agree = nmi = "-"
        if c.get("mean_identity_agreement") == c.get("mean_identity_agreement"):  # not NaN
            agree = (f"{c['mean_identity_agreement']:.3f} ({c['mean_chance_agreement']:.3f}, "
                     f"{c.get('mean_shuffled_identity_agreement', float('nan')):.3f})")
            nmi = f"{c['mean_nmi']:.3f} ({c.get('mean_shuffled_nmi', float('nan')):.3f})"
        lines.append(f"| {r['label']} | {r['router']} | {r['tokens']} | "
                     f"{r['mean_normalized_entropy']:.4f} | {r['mean_max_fraction']:.4f} | "
                     f"{r['mean_dead_experts']:.2f} | {agree} | {nmi} |")
    return "\n".join(lines)


def analyze(paths: list[str], prefix: str, num_tokens: int, labels: Optional[list[str]] = None,
            batch_size: int = 8, device: str = "cpu", progress: bool = True) -> list[dict]:
    """Routing summaries of several checkpoints over the same tokens: `prefix` is a token
    dataset for language models, an image root (or Hugging Face dataset) for ViTs."""
    from megatron_selfroute.checkpoint.consolidated import build_model, load_checkpoint

    labels = labels or [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels has {len(labels)} names for {len(paths)} checkpoints")
    out = []
    for path, label in zip(paths, labels, strict=True):
        ckpt = load_checkpoint(path)
        model = build_model(ckpt, path).to(device)
        if not model.moe_layers:
            raise ValueError(f"{path}: the checkpoint has no MoE layers")
        count = count_routes_images if ckpt.family == "vit" else count_routes
        moe = ckpt.cfg.moe
        cross = CrossLayerAccumulator(len(model.moe_layers), moe.num_experts, moe.moe_router_topk)
        counts, dropped = count(model, prefix, num_tokens, batch_size, progress, cross)
        out.append(summarize(label, path, model, counts, dropped, cross.result()))
    return out
