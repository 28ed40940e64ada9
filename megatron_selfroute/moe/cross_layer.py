"""Cross-layer routing metrics: does a token go to "the same" expert in every layer?

The paper conjectures that reading the same coordinates in every layer gives a consistent notion
of specialisation across layers. For every pair of MoE layers (l, m), over the same tokens:

- identity agreement  A[l, m] = P(top-1 expert in layer l == top-1 expert in layer m), against
  its chance level C[l, m] = sum_e f_l(e) f_m(e) (f = each layer's top-1 expert fractions): what
  two independent layers with those loads would give;
- top-k overlap  O[l, m] = mean over tokens of |S_l ∩ S_m| / k (S = the token's k experts);
- normalised mutual information of the two layers' top-1 experts,
  NMI[l, m] = I(X_l; X_m) / sqrt(H(X_l) H(X_m)) (the geometric-mean normaliser of Strehl &
  Ghosh; 0 when either entropy is 0), natural logarithms;
- a token-id baseline for A and NMI: layer m's top-1 experts are shuffled among the occurrences
  of the same token id (a seeded permutation within each id's group) before pairing with layer
  l. Routing that only follows the token id (hash routing) keeps its value under the shuffle;
  context-driven consistency is what the raw value has beyond the shuffled one.

Expert ids are compared by label: for learned routers layer l's expert 3 and layer m's expert 3
are unrelated, so a high agreement means something only where the labels are tied across layers
(self-routing's shared coordinates, a shared fixed projection, a shared hash table).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


def _nmi(joint_EE: np.ndarray) -> float:
    """NMI of a joint count table (rows: layer l's expert, columns: layer m's)."""
    total = joint_EE.sum()
    if total == 0:
        return 0.0
    p = joint_EE / total
    pl, pm = p.sum(1), p.sum(0)
    h_l = -np.sum(pl[pl > 0] * np.log(pl[pl > 0]))
    h_m = -np.sum(pm[pm > 0] * np.log(pm[pm > 0]))
    if h_l <= 0 or h_m <= 0:
        return 0.0
    nz = p > 0
    mi = np.sum(p[nz] * np.log(p[nz] / np.outer(pl, pm)[nz]))
    return float(max(mi, 0.0) / np.sqrt(h_l * h_m))


def _joint(a: np.ndarray, b: np.ndarray, e: int) -> np.ndarray:
    return np.bincount(a.astype(np.int64) * e + b, minlength=e * e).reshape(e, e)


def shuffle_within_ids(values_T: np.ndarray, token_ids_T: np.ndarray, seed: int = 0
                       ) -> np.ndarray:
    """`values_T` permuted among the positions that hold the same token id (seeded)."""
    rng = np.random.default_rng(seed)
    by_id = np.argsort(token_ids_T, kind="stable")
    shuffled = np.lexsort((rng.random(token_ids_T.size), token_ids_T))
    out = np.empty_like(values_T)
    out[by_id] = values_T[shuffled]
    return out


class CrossLayerAccumulator:
    """Streams expert ids [L, T, K] (+ token ids [T]) and computes the pair matrices."""

    def __init__(self, num_layers: int, num_experts: int, topk: int) -> None:
        self.L, self.E, self.K = num_layers, num_experts, topk
        self.overlap_sum = np.zeros((num_layers, num_layers), dtype=np.float64)
        self.top1: list[np.ndarray] = []
        self.token_ids: list[np.ndarray] = []
        self.tokens = 0

    def add(self, ids_LTK: Tensor, token_ids_T: Optional[Tensor] = None) -> None:
        ids = ids_LTK.detach().to("cpu", torch.int64)
        onehot = torch.zeros(self.L, ids.shape[1], self.E, dtype=torch.float32)
        onehot.scatter_(2, ids, 1.0)
        self.overlap_sum += torch.einsum("lte,mte->lm", onehot, onehot).double().numpy()
        dtype = np.uint8 if self.E <= 256 else np.int32
        self.top1.append(ids[..., 0].numpy().astype(dtype))
        if token_ids_T is not None:
            self.token_ids.append(token_ids_T.detach().reshape(-1).cpu().numpy().astype(np.int64))
        self.tokens += ids.shape[1]

    def result(self, seed: int = 0) -> dict:
        """The layer x layer matrices as nested lists, plus their off-diagonal means."""
        L, E = self.L, self.E
        top1 = np.concatenate(self.top1, axis=1) if self.top1 else np.zeros((L, 0), np.uint8)
        T = max(top1.shape[1], 1)
        frac = np.stack([np.bincount(top1[i].astype(np.int64), minlength=E) / T
                         for i in range(L)])
        out = {"tokens": int(top1.shape[1]), "identity_agreement": np.eye(L),
               "chance_agreement": frac @ frac.T, "topk_overlap": self.overlap_sum / (T * self.K),
               "nmi": np.eye(L)}
        tids = np.concatenate(self.token_ids) if self.token_ids else None
        if tids is not None and tids.size == top1.shape[1]:
            shuffled = [shuffle_within_ids(top1[m], tids, seed + m) for m in range(L)]
            out["shuffled_identity_agreement"] = np.zeros((L, L))
            out["shuffled_nmi"] = np.zeros((L, L))
        for i in range(L):
            for j in range(L):
                joint = _joint(top1[i], top1[j], E)
                out["identity_agreement"][i, j] = np.trace(joint) / T
                out["nmi"][i, j] = _nmi(joint)
                if "shuffled_nmi" in out and i != j:
                    sj = _joint(top1[i], shuffled[j], E)
                    out["shuffled_identity_agreement"][i, j] = np.trace(sj) / T
                    out["shuffled_nmi"][i, j] = _nmi(sj)
        off = ~np.eye(L, dtype=bool)
        means = {f"mean_{k}": (float(v[off].mean()) if L > 1 else float("nan"))
                 for k, v in out.items() if isinstance(v, np.ndarray)}
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()
                } | means


def cross_layer_live(model) -> dict[str, float]:
    """Mean identity agreement and its chance level over MoE layer pairs of the last forward
    (this rank's micro-batch): cheap TensorBoard scalars; {} with fewer than two MoE layers."""
    layers = model.moe_layers
    if len(layers) < 2 or layers[0].last_ids is None:
        return {}
    top1 = torch.stack([lay.last_ids[:, 0] for lay in layers])  # [L, T]
    L, E = top1.shape[0], layers[0].num_experts
    frac = torch.stack([torch.bincount(t, minlength=E) for t in top1]).double() / top1.shape[1]
    agree = (top1.unsqueeze(0) == top1.unsqueeze(1)).double().mean(-1)
    chance = frac @ frac.T
    off = ~torch.eye(L, dtype=torch.bool, device=agree.device)
    return {"cross_layer/identity_agreement": float(agree[off].mean()),
            "cross_layer/chance_agreement": float(chance[off].mean())}
