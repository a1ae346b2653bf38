"""Reconstruction losses."""

from __future__ import annotations

import torch

from aeforge.objectives import LossTerm


class PixelMSE(LossTerm):
    """Squared error between outputs[pred_key] and batch[target_key].

    reduction: "mean" (over every element) or "sum_per_sample" (summed over an example's elements, then
    averaged over the batch — the Gaussian negative log-likelihood up to constants, used by VAEs)."""

    def __init__(self, weight: float = 1.0, reduction: str = "mean", pred_key: str = "recon", target_key: str = "x"):
        super().__init__(weight)
        if reduction not in ("mean", "sum_per_sample"):
            raise ValueError(f"PixelMSE.reduction must be 'mean' or 'sum_per_sample', got {reduction!r}")
        self.reduction, self.pred_key, self.target_key = reduction, pred_key, target_key

    def forward(self, outputs, batch):
        err = (outputs[self.pred_key].float() - batch[self.target_key].float()).pow(2)
        return err.mean() if self.reduction == "mean" else err.flatten(1).sum(1).mean()


class PixelL1(LossTerm):
    """mean |outputs[pred_key] − batch[target_key]| over every element (images, clips, volumes)."""

    def __init__(self, weight: float = 1.0, pred_key: str = "recon", target_key: str = "x"):
        super().__init__(weight)
        self.pred_key, self.target_key = pred_key, target_key

    def forward(self, outputs, batch):
        return (outputs[self.pred_key].float() - batch[self.target_key].float()).abs().mean()


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation with the unbiased variance (MAE's norm_pix_loss)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


class MaskedPatchMSE(LossTerm):
    """MAE loss: per-patch MSE averaged over every masked patch in the batch (mask 1 = removed).
    outputs needs `pred` (B, L, P), `target` (B, L, P) and `mask` (B, L)."""

    def __init__(self, weight: float = 1.0, norm_pix: bool = True):
        super().__init__(weight)
        self.norm_pix = norm_pix

    def forward(self, outputs, batch):
        target = outputs["target"].float()
        if self.norm_pix:
            target = normalize_patches(target)
        per_patch = (outputs["pred"].float() - target).pow(2).mean(dim=-1)
        mask = outputs["mask"]
        return (per_patch * mask).sum() / mask.sum()
