"""Denoising-generator losses: flow-matching velocity regression (nn/flow.py) and DDPM ε-prediction
(nn/diffusion.py). The model samples t and the noise in its forward and returns prediction and target; the
term only compares them, so one term serves every generator (DiT in a latent, per-token heads, flow decoders)."""

from __future__ import annotations

import torch

from aeforge.objectives import LossTerm


class _PredictionMSE(LossTerm):
    def __init__(self, weight: float, key_pred: str, key_target: str, key_weight: str | None):
        super().__init__(weight)
        self.key_pred, self.key_target, self.key_weight = key_pred, key_target, key_weight

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        pred, target = outputs[self.key_pred], outputs[self.key_target]
        if pred.shape != target.shape:
            raise ValueError(
                f"{type(self).__name__}: outputs[{self.key_pred!r}] {tuple(pred.shape)} and "
                f"outputs[{self.key_target!r}] {tuple(target.shape)} differ in shape"
            )
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.key_weight is not None:  # e.g. LDAE's per-timestep w_t, computed by the model with its t
            per_sample = per_sample * outputs[self.key_weight].float().view(-1)
        return per_sample.mean()


class VelocityLoss(_PredictionMSE):
    """mean ‖v_θ(x_t, t) − (ε − x)‖² over elements and samples (optionally weighted per sample by
    outputs[key_weight])."""

    def __init__(self, weight: float = 1.0, key_pred: str = "v_pred", key_target: str = "v_target",
                 key_weight: str | None = None):
        super().__init__(weight, key_pred, key_target, key_weight)


class EpsilonLoss(_PredictionMSE):
    """mean ‖ε_θ(x_t, t) − ε‖² (DDPM's simple loss; optionally weighted per sample by outputs[key_weight])."""

    def __init__(self, weight: float = 1.0, key_pred: str = "eps_pred", key_target: str = "eps",
                 key_weight: str | None = None):
        super().__init__(weight, key_pred, key_target, key_weight)
