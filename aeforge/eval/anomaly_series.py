"""Time-series anomaly detection: point-adjusted and unadjusted best F1, AUROC, AUPRC on point scores.

A window's score is the score of its last step (the DataModule's `t` says which point that is; `series` says
which entity, so an anomaly segment never spans two entities). Metrics:
- `f1`, `precision`, `recall`: the best F1 over all thresholds on the raw point scores (aeforge.eval.anomaly).
- `pa_f1`, `pa_precision`, `pa_recall`: the same after point adjustment (OmniAnomaly/USAD protocol): when any
  point of a true anomaly segment is flagged, the whole segment counts as detected. Computed exactly: at any
  threshold, the adjusted prediction of a segment's points equals thresholding the segment's maximum score, so
  the best adjusted F1 is the best F1 of the scores with each segment's points raised to its maximum. This
  flatters a detector (one hit inside a long segment is worth the segment): read it beside `f1`.
- `auroc`, `auprc`, `anomaly_rate` (AUPRC's chance level): threshold-free, on the raw scores.
Best-over-thresholds is an oracle threshold, as the literature reports it; it measures separability.
"""

from __future__ import annotations

import numpy as np
import torch

from aeforge.eval.anomaly import anomaly_metrics, best_f1
from aeforge.eval.skips import skipped


def segments(labels: np.ndarray, series: np.ndarray | None = None) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of 1s in `labels` (in time order) that stays within one series."""
    labels = np.asarray(labels).astype(bool)
    if series is None:
        series = np.zeros(len(labels), np.int64)
    starts = labels & ~np.r_[False, labels[:-1] & (series[1:] == series[:-1])]
    ends = labels & ~np.r_[labels[1:] & (series[1:] == series[:-1]), False]
    return list(zip(np.flatnonzero(starts).tolist(), (np.flatnonzero(ends) + 1).tolist()))


def point_adjust(pred: np.ndarray, labels: np.ndarray, series: np.ndarray | None = None) -> np.ndarray:
    """Binary predictions with every true segment that has one flagged point flagged whole."""
    out = np.asarray(pred).astype(bool).copy()
    for s, e in segments(labels, series):
        if out[s:e].any():
            out[s:e] = True
    return out


def point_adjusted_scores(scores: np.ndarray, labels: np.ndarray, series: np.ndarray | None = None) -> np.ndarray:
    """Scores whose thresholding gives the point-adjusted predictions at every threshold: each segment's points
    take its maximum score (normal points keep theirs)."""
    out = np.asarray(scores, dtype=np.float64).copy()
    for s, e in segments(labels, series):
        out[s:e] = out[s:e].max()
    return out


def precision_recall_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    pred, labels = scores >= threshold, np.asarray(labels).astype(bool)
    tp = float((pred & labels).sum())
    return tp / max(float(pred.sum()), 1.0), tp / max(float(labels.sum()), 1.0)


def series_metrics(scores, labels, series=None) -> dict[str, float]:
    """All of the module doc's metrics for point scores in time order (labels 0/1, optional series ids)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    out = anomaly_metrics(scores, labels)  # checks finiteness and that both classes are present
    out["f1"] = out.pop("best_f1")
    _, thr = best_f1(scores, labels)
    out["precision"], out["recall"] = precision_recall_at(scores, labels, thr)
    adjusted = point_adjusted_scores(scores, labels, series)
    out["pa_f1"], pa_thr = best_f1(adjusted, labels)
    out["pa_precision"], out["pa_recall"] = precision_recall_at(adjusted, labels, pa_thr)
    out["segments"] = float(len(segments(labels, series)))
    out["points"] = float(len(labels))
    return out


@torch.no_grad()
def collect_point_scores(ctx, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, series) of the points that the windows of `split` end at, sorted by time."""
    scores, labels, t, series = [], [], [], []
    for batch in ctx.batches(split, f"series anomaly scores ({split})"):
        scores.append(ctx.model.anomaly_score(batch).float().flatten().cpu())
        labels.append(batch["anomaly"].flatten().cpu())
        t.append(batch["t"].flatten().cpu())
        series.append(batch["series"].flatten().cpu())
    t = torch.cat(t).numpy()
    order = np.argsort(t, kind="stable")
    return tuple(torch.cat(v).numpy()[order] for v in (scores, labels, series))


class SeriesAnomalyDetection:
    """Point-adjusted and unadjusted best F1, AUROC, AUPRC of the model's window scores on `split`."""

    def __init__(self, split: str = "test"):
        self.split = split

    def __call__(self, ctx) -> dict[str, float]:
        who = type(self).__name__
        if not hasattr(ctx.model, "anomaly_score"):
            return skipped(who, f"{type(ctx.model).__name__} has no anomaly_score()")
        scores, labels, series = collect_point_scores(ctx, self.split)
        if labels.min() == labels.max():  # e.g. eval.max_samples cut the test series before its first anomaly
            return skipped(who, f"the {len(labels)} scored points of {self.split!r} hold one class only")
        return series_metrics(scores, labels, series)
