"""Deep-linear JEPA and MAE losses (card 8, Littwin et al. 2024), on the outputs of `DeepLinearSSL`.

Both are ½ E‖V W̄ x − target‖² (squared error summed over features, averaged over the batch, so that full-batch
GD on exact-moment data is GD on the card's population loss):
  target = "embedding": W̄ y, the target view through the same encoder, stop-gradient (JEPA / self-distillation);
  target = "view":      y itself (MAE: predict the other view in input space).
"""

from __future__ import annotations

import torch

from aeforge.objectives import LossTerm, Metric

TARGETS = {"embedding": "jepa", "view": "mae"}


class DeepLinearSSLLoss(LossTerm):
    """½ E‖pred − target‖²; `target` picks the objective (embedding: JEPA, view: MAE). The JEPA target comes from
    the model (`target_embedding`, detached there when model.stop_grad_target); the MAE target from the batch."""

    def __init__(self, target: str, weight: float = 1.0):
        super().__init__(weight)
        if target not in TARGETS:
            raise ValueError(f"objective term target={target!r}; valid: {sorted(TARGETS)} (embedding = JEPA, "
                             f"view = MAE)")
        self.target = target

    @property
    def dynamics(self) -> str:
        return TARGETS[self.target]

    def forward(self, outputs, batch):
        goal = outputs["target_embedding"] if self.target == "embedding" else batch["target"]
        return 0.5 * (outputs["pred"] - goal).pow(2).sum(dim=1).mean()


class FeatureGain(Metric):
    """Logged learning curve of one feature: the i-th diagonal entry of the encoder's end-to-end map W̄."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, outputs, batch):
        w = outputs["encoder_map"]
        if self.index >= w.shape[0]:
            raise ValueError(f"FeatureGain index={self.index}, but the data has {w.shape[0]} features")
        return w[self.index, self.index]


class OffDiagonal(Metric):
    """‖offdiag W̄‖_F / ‖W̄‖_F: 0 while the encoder stays diagonal, as the per-feature ODE assumes."""

    def forward(self, outputs, batch):
        w = outputs["encoder_map"]
        off = w - torch.diag_embed(torch.diagonal(w))
        return off.norm() / w.norm().clamp_min(1e-30)
