"""ceVAE / StRegA loss (card 11): L = (1 − ce_factor)·(θ·Rec_L1 + β·KL_mean) + ce_factor·L_CE.

- Rec_L1 = mean |x̂ − x| (VAE branch), L_CE = mean |VAE(x_corrupted) − x| (context-encoding branch);
- KL_mean: the KL of aeforge/objectives/kl.py averaged over latent dims instead of summed (the card: StRegA
  averages both terms);
- θ and β are the `weight`s of the rec and kl terms; ce_factor mixes the branches (CeVAEObjective).
"""

from __future__ import annotations

import torch

from aeforge.objectives import LossTerm, Objective
from aeforge.objectives.kl import GaussianKL
from aeforge.objectives.reconstruction import PixelL1


class ContextEncodingL1(PixelL1):
    """The context-encoding branch: mean |ceVAE(corrupted x) − x| (the clean x is the target everywhere)."""

    def __init__(self, weight: float = 1.0):
        super().__init__(weight, pred_key="recon_ce")


class MeanGaussianKL(GaussianKL):
    """GaussianKL with reduction over latent dims: "mean" (StRegA) or "sum" (the classic ELBO)."""

    def __init__(self, weight: float = 1.0, reduction: str = "mean"):
        super().__init__(weight)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"kl.reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, outputs, batch):
        kl = super().forward(outputs, batch)
        return kl / outputs["mu"].shape[1] if self.reduction == "mean" else kl


class CeVAEObjective(Objective):
    """Objective whose context-encoding terms (ContextEncodingL1) are scaled by ce_factor and every other term
    by 1 − ce_factor; a branch with factor 0 is not computed (ce_factor=0: the plain VAE, whose model has no
    context-encoding output)."""

    def __init__(self, terms: dict[str, LossTerm], metrics: dict | None = None, ce_factor: float = 0.5):
        super().__init__(terms, metrics)
        if not 0 <= ce_factor <= 1:
            raise ValueError(f"objective.ce_factor={ce_factor} must be in [0, 1]")
        self.ce_factor = ce_factor

    def mix(self, term: LossTerm) -> float:
        return self.ce_factor if isinstance(term, ContextEncodingL1) else 1.0 - self.ce_factor

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        active = {n: t for n, t in self.terms.items() if self.mix(t) > 0}
        values = {n: self._call(n, t, outputs, batch) for n, t in active.items()}
        loss = sum(self.mix(t) * t.weight * values[n] for n, t in active.items())
        with torch.no_grad():
            metrics = {n: self._call(n, m, outputs, batch) for n, m in self.metrics.items()}
        return {"loss": loss, **values, **metrics}
