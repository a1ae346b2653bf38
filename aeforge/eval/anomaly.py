"""Anomaly detection: the shared scores-and-labels metrics and the evaluator every anomaly method reports with.

Contract: a batch of an anomaly DataModule carries `anomaly` (B,), 1 = anomalous, 0 = normal (never `y`, which
stays the class label that probes read); a model scores it with `anomaly_score(batch) -> (B,)`, higher = more
anomalous. The score is the model's own method (APRE's adjustable error, MSS's mean shift, a VAE's combined
score), decoupled from its training loss. Threshold-free metrics (AUROC, AUPRC) come from scikit-learn;
best-F1 is the best F1 over all thresholds on the precision-recall curve, as the literature reports it (an
oracle threshold: it says how separable the scores are, not what a deployed detector achieves)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm

from aeforge.eval.skips import skipped


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1 over thresholds, the threshold reaching it); a point is flagged when score >= threshold."""
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0  # the curve's last point has no threshold
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("inf")


def anomaly_metrics(scores, labels) -> dict[str, float]:
    """auroc, auprc (average precision), best_f1 and the anomaly rate of `labels` (AUPRC's chance level)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} anomaly scores are NaN/Inf")
    if labels.min() == labels.max():
        raise ValueError("anomaly metrics need both normal (0) and anomalous (1) samples in the labels")
    f1, _ = best_f1(scores, labels)
    return {
        "auroc": float(skm.roc_auc_score(labels, scores)),
        "auprc": float(skm.average_precision_score(labels, scores)),
        "best_f1": f1,
        "anomaly_rate": float(labels.mean()),
    }


@torch.no_grad()
def collect_scores(ctx, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The model's anomaly scores and the labels of every sample of `split` (normalised batches, no augmentation)."""
    scores, labels = [], []
    for batch in ctx.batches(split, f"anomaly scores ({split})"):
        scores.append(ctx.model.anomaly_score(batch).float().flatten().cpu())
        labels.append(batch["anomaly"].flatten().cpu())
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def capped_one_class(labels, ctx, who: str) -> dict[str, float] | None:
    """The skip record when eval.max_samples cut the split down to one class (a smoke run's 16 samples); None
    otherwise. On a whole split one class stays an error (anomaly_metrics raises): the data is wrong."""
    labels = np.asarray(labels)
    if ctx.max_samples is None or len(labels) == 0 or labels.min() != labels.max():
        return None
    return skipped(who, f"the first eval.max_samples={ctx.max_samples} samples hold only label {int(labels[0])}")


class AnomalyDetection:
    """auroc / auprc / best_f1 of the model's anomaly_score on the DataModule's test split."""

    def __init__(self, split: str = "test"):
        self.split = split

    def __call__(self, ctx) -> dict[str, float]:
        if not hasattr(ctx.model, "anomaly_score"):
            return skipped(type(self).__name__, f"{type(ctx.model).__name__} has no anomaly_score()")
        scores, labels = collect_scores(ctx, self.split)
        return capped_one_class(labels, ctx, type(self).__name__) or anomaly_metrics(scores, labels)
