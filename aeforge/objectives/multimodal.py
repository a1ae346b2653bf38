"""PHG-MAE's per-modality losses over a channel stack: L1 (or L2) on continuous modalities, cross-entropy
on the semantic map (labelled frames only). Which modalities count and the weights are [OPEN] in the paper;
the defaults (every modality, weight 1, L1) are aeforge choices. DistillLoss: the student's target block
against the teacher ensemble's probabilities (PHGDistill)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeforge.objectives import LossTerm

# a pixel without a semantic label: a pseudo-label map not written yet, or below its confidence threshold
NO_LABEL = 255


class ModalityLoss(LossTerm):
    """One modality's loss. outputs: pred (B, C, H, W), keep (B, M); batch: x (full stack), sem (B, H, W),
    optionally labeled (B,). `blocks` comes from the model (outputs["blocks"] is not needed: the term reads
    its channel slice from `modalities`/`num_semantic`, the same layout rule as the model).

    only_masked: average over the samples where this modality was dropped from the input only."""

    def __init__(
        self,
        modality: str,
        modalities: list[str],
        num_semantic: int = 8,
        weight: float = 1.0,
        kind: str = "l1",
        only_masked: bool = False,
    ):
        super().__init__(weight)
        from aeforge.data.video_modalities import layout

        if kind not in ("l1", "l2", "ce"):
            raise ValueError(f"ModalityLoss.kind must be l1, l2 or ce, got {kind!r}")
        blocks = layout(list(modalities), num_semantic)
        if modality not in blocks:
            raise ValueError(f"modality {modality!r} is not among {list(modalities)}")
        self.modality, self.kind, self.only_masked = modality, kind, only_masked
        self.index, self.block = list(blocks).index(modality), blocks[modality]

    def forward(self, outputs, batch):
        pred = outputs["pred"][:, self.block].float()
        b = pred.shape[0]
        w = torch.ones(b, device=pred.device)
        if self.only_masked:
            w = w * (~outputs["keep"][:, self.index]).float()
        if self.kind == "ce":
            if "labeled" in batch:
                w = w * batch["labeled"].float()
            # the mean over labelled pixels: pixels labelled NO_LABEL (pseudo-labels below their confidence
            # threshold) do not count, and a frame with few labelled pixels weighs by those pixels only
            pixels = (batch["sem"] != NO_LABEL).flatten(1) * w[:, None]
            per = F.cross_entropy(pred, batch["sem"], reduction="none", ignore_index=NO_LABEL).flatten(1)
            return (per * pixels).sum() / pixels.sum().clamp_min(1.0)
        else:
            target = batch["x"][:, self.block].float()
            err = (pred - target).abs() if self.kind == "l1" else (pred - target).pow(2)
            per = err.flatten(1).mean(1)
        return (per * w).sum() / w.sum().clamp_min(1.0)


class DistillLoss(LossTerm):
    """Cross-entropy of the student's `modality` logits to the teacher's probabilities outputs["soft"],
    -sum_c p_c log q_c per pixel, averaged (KL to the teacher plus its constant entropy). Every frame counts,
    labelled or not: the teacher labels them all [OPEN: the paper's distillation loss]."""

    def __init__(self, modalities: list[str], num_semantic: int = 8, modality: str = "semantic", weight: float = 1.0):
        super().__init__(weight)
        from aeforge.data.video_modalities import layout

        blocks = layout(list(modalities), num_semantic)
        if modality not in blocks:
            raise ValueError(f"modality {modality!r} is not among {list(modalities)}")
        self.block = blocks[modality]

    def forward(self, outputs, batch):
        logq = F.log_softmax(outputs["pred"][:, self.block].float(), dim=1)
        return -(outputs["soft"].float() * logq).sum(1).mean()
