"""LDAE's 2.5-D perceptual term (card 7: LPIPS with SqueezeNet, "fake 3-D" ratio 0.5, as MONAI's
PerceptualLoss(is_fake_3d=True)): 2-D LPIPS on slices of the volume along each of its three axes, a random
`fake_3d_ratio` share of the slices per axis, the three means summed. The LPIPS network and its weights are
aeforge/objectives/perceptual.py's (a random backbone with a warning unless `weights` is given)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aeforge.objectives import LossTerm
from aeforge.objectives.perceptual import build_lpips, lpips_distance


class SliceLPIPS(LossTerm):
    def __init__(
        self,
        weight: float = 1.0,
        net: str = "squeeze",
        weights: str | None = None,
        fake_3d_ratio: float = 0.5,
        key_pred: str = "recon",
        key_target: str = "x",
    ):
        super().__init__(weight)
        if not 0 < fake_3d_ratio <= 1:
            raise ValueError(f"objective SliceLPIPS fake_3d_ratio={fake_3d_ratio} must be in (0, 1]")
        if weights is not None and not Path(weights).is_file():
            raise ValueError(f"objective SliceLPIPS weights={weights!r}: no such file (a torchvision {net} state_dict)")
        self.net = build_lpips(net, weights)
        self.ratio, self.key_pred, self.key_target = fake_3d_ratio, key_pred, key_target

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        pred, target = outputs[self.key_pred], batch[self.key_target]
        if pred.ndim != 5:
            raise ValueError(f"SliceLPIPS takes volumes (B, C, D, H, W), got {tuple(pred.shape)}")
        total = pred.new_zeros(())
        for axis in (2, 3, 4):
            n = pred.shape[axis]
            keep = torch.randperm(n, device=pred.device)[: max(1, math.ceil(self.ratio * n))]
            a, b = pred.index_select(axis, keep), target.index_select(axis, keep)
            # slices of this axis as the "frames" lpips_distance scores one by one: (B, C, S, h, w)
            a, b = a.movedim(axis, 2), b.movedim(axis, 2)
            total = total + lpips_distance(a, b, self.net).mean()
        return total
