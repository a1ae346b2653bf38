"""Mean-shift outlier scoring (MSS, Tan et al., arXiv 2304.00709; card 12) on top of any autoencoder.

Instead of comparing the AE's output f(x) with x, compare it with x's k-NN mean-shifted version x^{MS(k,m)}:
inliers move little toward their local mode, an outlier that the AE reconstructs "too well" is pulled toward
the inlier mass and its error grows. The model still reads the original x; only the target changes.

- Pool P = the train part (unlabelled). One shift of P replaces each point by the mean of its k nearest
  neighbours in P, itself included; P^(j) = j shifts.
- A scored point: step j (1..m) replaces t by the mean of {t} ∪ its k − 1 nearest neighbours in P^(j−1)
  (t starts at x), so m = 1 is the mean of x and its k − 1 nearest train rows.
- The score is the model's own `anomaly_score` with `batch["target"] = x^{MS}` (the squared error for an AE or
  VAE, APRE for the PAE); models declare they honour the target with `score_target = True`.

The paper selects k (and m) by validation ROC-AUC, i.e. with outlier labels; the unsupervised ADBench protocol
has none, so k and m are fixed in the config (`ks`, `iterations`), and every (k, m) asked for is reported."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from aeforge.eval.anomaly import anomaly_metrics, capped_one_class
from aeforge.eval.skips import skipped


def shift_pool(pool: np.ndarray, k: int) -> np.ndarray:
    """One mean-shift iteration on a set: each point -> mean of its k nearest neighbours in it (itself included)."""
    idx = NearestNeighbors(n_neighbors=min(k, len(pool))).fit(pool).kneighbors(pool, return_distance=False)
    return pool[idx].mean(1)


class MeanShift:
    """x -> x^{MS(k, m)} against a fixed pool (the train part); the shifted pools are built once."""

    def __init__(self, pool: np.ndarray, k: int, iterations: int):
        if k < 2:
            raise ValueError(f"mean-shift k={k}: k must be >= 2 (k = 1 leaves every point where it is)")
        if iterations < 1:
            raise ValueError(f"mean-shift iterations={iterations} must be >= 1")
        self.k = min(k, len(pool) + 1)
        self.pools = [np.asarray(pool, dtype=np.float64)]
        for _ in range(iterations - 1):
            self.pools.append(shift_pool(self.pools[-1], self.k))
        self.index = [NearestNeighbors(n_neighbors=self.k - 1).fit(p) for p in self.pools]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = np.asarray(x, dtype=np.float64)
        for pool, index in zip(self.pools, self.index):
            idx = index.kneighbors(t, return_distance=False)
            t = (t + pool[idx].sum(1)) / self.k
        return t


def _fmt(v: float) -> str:
    return f"{v:g}"


class MeanShiftScoring:
    """auroc / auprc / best_f1 of the model's score against mean-shifted targets, for every k in `ks` and m in
    `iterations` (keys `k<k>_m<m>/<metric>`). `weights`: extra (α, β) pairs for a probabilistic model (one with
    `error_terms`), reported for the plain target (`x_a<α>_b<β>/…`) and each shifted one
    (`k<k>_m<m>_a<α>_b<β>/…`), e.g. [[1, 1]] for PRE beside the model's own APRE weights."""

    def __init__(self, split: str = "test", ks: list[int] | None = None, iterations: list[int] | None = None,
                 weights: list[list[float]] | None = None):
        self.split, self.ks, self.iterations = split, list(ks or [10]), list(iterations or [1])
        self.weights = [tuple(w) for w in (weights or [])]
        if any(k < 2 for k in self.ks) or any(m < 1 for m in self.iterations):
            raise ValueError(f"eval mss: ks must be >= 2 and iterations >= 1, got ks={self.ks}, "
                             f"iterations={self.iterations}")
        if any(len(w) != 2 or min(w) < 0 for w in self.weights):
            raise ValueError(f"eval mss.weights: a list of [alpha, beta] pairs >= 0, got {weights}")

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model = ctx.model
        if not getattr(model, "score_target", False):
            return skipped(type(self).__name__, f"{type(model).__name__}'s anomaly_score does not read a target")
        pool = torch.cat([b["x"].flatten(1).float().cpu() for b in ctx.batches("train", "MSS pool")]).numpy()
        batches = list(ctx.batches(self.split, f"MSS scores ({self.split})"))
        x = torch.cat([b["x"].flatten(1).float().cpu() for b in batches]).numpy()
        labels = torch.cat([b["anomaly"].flatten().cpu() for b in batches]).numpy()
        skip = capped_one_class(labels, ctx, type(self).__name__)
        if skip:
            return skip
        variants: dict[str, np.ndarray | None] = {}
        if self.weights:
            variants["x"] = None  # the plain target, for the extra weightings
        for m in sorted(set(self.iterations)):
            for k in sorted(set(self.ks)):
                variants[f"k{k}_m{m}"] = MeanShift(pool, k, m)(x)
        weighted = self.weights if hasattr(model, "error_terms") else []
        out: dict[str, float] = {}
        for name, target in variants.items():
            scores, terms = [], []
            start = 0
            for b in batches:
                n = len(b["x"])
                batch = dict(b)
                if target is not None:
                    t = torch.as_tensor(target[start:start + n], dtype=b["x"].dtype, device=b["x"].device)
                    batch["target"] = t.view_as(b["x"])
                start += n
                if target is not None:
                    scores.append(model.anomaly_score(batch).float().cpu())
                if weighted:
                    terms.append(model.error_terms(batch).float().cpu())
            if scores:
                out.update({f"{name}/{k}": v for k, v in anomaly_metrics(torch.cat(scores).numpy(), labels).items()
                            if k != "anomaly_rate"})
            if terms:
                t = torch.cat(terms).numpy()
                for a, b_ in weighted:
                    tag = f"{name}_a{_fmt(a)}_b{_fmt(b_)}"
                    metrics = anomaly_metrics(a * t[:, 0] + b_ * t[:, 1], labels)
                    out.update({f"{tag}/{k}": v for k, v in metrics.items() if k != "anomaly_rate"})
        return out
