"""Supervised loss terms for fine-tuning-time objectives (FMAE-IAT's task and identity heads, PHG-MAE's
semantic output): classification losses and logged-only accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeforge.objectives import LossTerm, Metric

KINDS = ("ce", "bce_onehot", "bce")


class ClassificationLoss(LossTerm):
    """Loss between outputs[pred_key] (B, C) logits and batch[target_key].

    kind: "ce" softmax cross-entropy on integer labels; "bce_onehot" BCEWithLogits against the one-hot
    vector of integer labels, averaged over classes and batch (FMAE-IAT's identity loss, as in the official
    code); "bce" BCEWithLogits on multi-hot float targets (multi-label tasks such as AU detection)."""

    def __init__(
        self,
        weight: float = 1.0,
        pred_key: str = "logits",
        target_key: str = "y",
        kind: str = "ce",
        label_smoothing: float = 0.0,
    ):
        super().__init__(weight)
        if kind not in KINDS:
            raise ValueError(f"ClassificationLoss.kind must be one of {KINDS}, got {kind!r}")
        self.pred_key, self.target_key, self.kind, self.label_smoothing = (
            pred_key,
            target_key,
            kind,
            label_smoothing,
        )

    def forward(self, outputs, batch):
        if self.pred_key not in outputs:
            raise KeyError(
                f"the model's outputs have no {self.pred_key!r} (has {sorted(outputs)}); "
                f"is the head this loss needs configured?"
            )
        logits, target = outputs[self.pred_key].float(), batch[self.target_key]
        if self.kind == "ce":
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        if self.kind == "bce_onehot":
            target = F.one_hot(target.long(), logits.shape[1]).float()
        return F.binary_cross_entropy_with_logits(logits, target.float())


class Accuracy(Metric):
    """Top-1 accuracy of outputs[pred_key] against batch[target_key], a metric (objective.metrics)."""

    def __init__(self, pred_key: str = "logits", target_key: str = "y"):
        super().__init__()
        self.pred_key, self.target_key = pred_key, target_key

    def forward(self, outputs, batch):
        if self.pred_key not in outputs:
            return torch.zeros((), device=batch[self.target_key].device)
        with torch.no_grad():
            return (outputs[self.pred_key].argmax(1) == batch[self.target_key]).float().mean()


class UniformTargetLoss(LossTerm):
    """Distance of outputs[pred_key] (B, C) logits from the uniform class distribution: the confusion loss
    (Alvi et al., ECCV-W 2018) that pulls a backbone towards features an identity head cannot separate.
    kind "ce": cross-entropy of softmax(logits) to 1/C; "bce": BCEWithLogits of every logit to 1/C (the
    matching target for a head trained with bce_onehot). Both are smallest when the head cannot decide."""

    def __init__(self, weight: float = 1.0, pred_key: str = "id_confusion_logits", kind: str = "bce"):
        super().__init__(weight)
        if kind not in ("ce", "bce"):
            raise ValueError(f"UniformTargetLoss.kind must be 'ce' or 'bce', got {kind!r}")
        self.pred_key, self.kind = pred_key, kind

    def forward(self, outputs, batch):
        logits = outputs[self.pred_key].float()
        if self.kind == "ce":
            return -logits.log_softmax(1).mean()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 / logits.shape[1]))
