"""Action-unit detection F1 of a multi-label task head (`eval=iat_au`): the protocols of FMAE-IAT's code
(F1 at 0.5, F1 at the best global threshold on the evaluated split itself) and a clean one (the threshold
tuned on another split), plus per-AU ROC AUC."""

from __future__ import annotations

import torch


def multilabel_f1(probs: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(T, A) binary F1 of every label a at every threshold t: pred = probs >= t; F1 = 2TP / (2TP + FP + FN),
    0 where a label has neither positives nor predictions (sklearn's zero_division=0)."""
    pred = probs[None] >= thresholds.view(-1, 1, 1).to(probs)
    pos = target.bool()[None]
    tp = (pred & pos).sum(1).double()
    denom = 2 * tp + (pred & ~pos).sum(1) + (~pred & pos).sum(1)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def au_metrics(probs: torch.Tensor, target: torch.Tensor, tune: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> dict[str, float]:
    """FMAE-IAT's AU-detection numbers for sigmoid outputs probs (N, A) and multi-hot targets (N, A):
    f1_at_0.5 (mean over AUs at threshold 0.5, what the official code prints); f1_best_threshold and
    best_threshold (one global threshold swept over 0.01..0.99 on *these* targets, the number the official
    code returns: test-tuned); auc (mean per-AU ROC AUC, AUs with one class skipped); with tune = (probs,
    targets) of another split, f1_tuned_threshold: this split's F1 at the threshold best on that split (a
    clean protocol)."""
    from sklearn.metrics import roc_auc_score

    thresholds = torch.linspace(0.01, 0.99, 99)
    mean_f1 = multilabel_f1(probs, target, thresholds).mean(1)
    best = int(mean_f1.argmax())
    out = {
        "f1_at_0.5": float(multilabel_f1(probs, target, torch.tensor([0.5])).mean()),
        "f1_best_threshold": float(mean_f1[best]),
        "best_threshold": float(thresholds[best]),
    }
    aucs = [roc_auc_score(target[:, a].numpy(), probs[:, a].numpy()) for a in range(target.shape[1])
            if 0 < target[:, a].sum() < len(target)]
    out["auc"] = float(sum(aucs) / len(aucs)) if aucs else float("nan")
    if tune is not None:
        t = thresholds[int(multilabel_f1(*tune, thresholds).mean(1).argmax())]
        out["f1_tuned_threshold"] = float(multilabel_f1(probs, target, t.view(1)).mean())
        out["tuned_threshold"] = float(t)
    return out


class AUF1:
    """Evaluator for a multi-label task head (objective.terms.task.kind=bce, multi-hot batch[label_key]):
    au_metrics of sigmoid(outputs[pred_key]) on the val split, with the threshold also tuned on `tune_split`
    (the train split by default; null: skip) for the clean protocol."""

    def __init__(self, pred_key: str = "logits", label_key: str = "y", tune_split: str | None = "train"):
        self.pred_key, self.label_key, self.tune_split = pred_key, label_key, tune_split

    @torch.no_grad()
    def _outputs(self, ctx, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        probs, targets = [], []
        for batch in ctx.batches(split, f"AU F1 ({split})"):
            out = ctx.model(batch)
            if self.pred_key not in out:
                raise KeyError(f"AUF1: the model's outputs have no {self.pred_key!r} (has {sorted(out)})")
            probs.append(out[self.pred_key].float().sigmoid().cpu())
            targets.append(batch[self.label_key].cpu())
        probs, targets = torch.cat(probs), torch.cat(targets)
        if targets.shape != probs.shape:
            raise ValueError(f"AUF1 needs multi-hot {self.label_key!r} of the head's shape {tuple(probs.shape)}, got "
                             f"{tuple(targets.shape)} (single-label data: use HeadAccuracy)")
        return probs, targets

    def __call__(self, ctx) -> dict[str, float]:
        tune = self._outputs(ctx, self.tune_split) if self.tune_split else None
        return au_metrics(*self._outputs(ctx, "val"), tune=tune)
