"""APRE's training loss: the heteroscedastic Gaussian NLL ("probabilistic reconstruction error", PRE).

PRE(x) = α Σ_j (μ_j − x_j)² / (σ_j² + ε) + β Σ_j log(σ_j² + ε), summed over features, averaged over the batch
(constants dropped, as the APRE code). Training uses α = β = 1 (the Gaussian NLL ×2); the adjustable weights
are a scoring knob of the model (aeforge/models/apre.py), exposed here too for ablations."""

from __future__ import annotations

import torch

from aeforge.objectives import LossTerm

VAR_EPS = 1e-5


def gaussian_nll_terms(mean: torch.Tensor, var: torch.Tensor, target: torch.Tensor, eps: float = VAR_EPS):
    """Per-sample (Σ_j (μ_j − t_j)² / (σ_j² + ε), Σ_j log(σ_j² + ε)), each (B,)."""
    v = var.flatten(1).float() + eps
    err = (mean.flatten(1).float() - target.flatten(1).float()).pow(2) / v
    return err.sum(1), v.log().sum(1)


class GaussianNLL(LossTerm):
    """PRE / APRE as a loss: reads outputs `recon` (μ) and `var` (σ²), target batch[target_key]."""

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 1.0, eps: float = VAR_EPS,
                 target_key: str = "x"):
        super().__init__(weight)
        if alpha < 0 or beta < 0:
            raise ValueError(f"GaussianNLL alpha={alpha}, beta={beta} must be >= 0")
        self.alpha, self.beta, self.eps, self.target_key = alpha, beta, eps, target_key

    def forward(self, outputs, batch):
        err, logvar = gaussian_nll_terms(outputs["recon"], outputs["var"], batch[self.target_key], self.eps)
        return (self.alpha * err + self.beta * logvar).mean()
