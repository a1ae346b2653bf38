"""Loss terms of sentence models (AriEL's LM, the sentence AE / VAE baselines): next-token cross-entropy over
the words and EOS of each sentence (PAD masked), the VAE's KL with Bowman-style annealing, token accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aeforge.data.sentences import EOS
from aeforge.objectives import LossTerm, Metric
from aeforge.objectives.kl import GaussianKL


def token_mask(x: torch.Tensor) -> torch.Tensor:
    """True on the words and the EOS of each row (B, T), False on the PAD after it."""
    lengths = (x == EOS).int().argmax(1) + 1
    return torch.arange(x.shape[1], device=x.device) < lengths[:, None]


class TokenCrossEntropy(LossTerm):
    """-log p(w_t | ...) of the sentence's tokens. reduction: mean_token (per token, the LM's usual loss) or
    sum_per_sentence (summed over a sentence, averaged over the batch: the ELBO's reconstruction term)."""

    def __init__(self, weight: float = 1.0, reduction: str = "mean_token"):
        super().__init__(weight)
        if reduction not in ("mean_token", "sum_per_sentence"):
            raise ValueError(f"reduction={reduction!r}; valid: ['mean_token', 'sum_per_sentence']")
        self.reduction = reduction

    def forward(self, outputs, batch):
        x = batch["x"]
        mask = token_mask(x)
        # PAD positions are ignored, not multiplied by 0: PAD's logit is -inf, and inf * 0 is NaN
        targets = torch.where(mask, x, torch.full_like(x, -100))
        nll = F.cross_entropy(outputs["logits"].float().flatten(0, 1), targets.flatten(), reduction="none",
                              ignore_index=-100).view_as(x)
        if self.reduction == "mean_token":
            return nll.sum() / mask.sum()
        return nll.sum(1).mean()


def kl_weight(progress, anneal_fraction: float, schedule: str) -> float:
    """The KL multiplier at this point of training: 0 -> 1 over the first anneal_fraction of the steps,
    linearly or along a logistic curve (Bowman et al. 2016); 1 without progress (evaluation)."""
    if progress is None or anneal_fraction <= 0:
        return 1.0
    f = min(progress.fraction / anneal_fraction, 1.0)
    if schedule == "linear":
        return f
    return 1.0 / (1.0 + math.exp(-12.0 * (f - 0.5))) if f < 1.0 else 1.0


class AnnealedGaussianKL(GaussianKL):
    """GaussianKL times the annealing multiplier read from batch["progress"] (KL-vanishing remedy)."""

    def __init__(self, weight: float = 1.0, anneal_fraction: float = 0.3, schedule: str = "logistic"):
        super().__init__(weight)
        if schedule not in ("linear", "logistic"):
            raise ValueError(f"schedule={schedule!r}; valid: ['linear', 'logistic']")
        self.anneal_fraction, self.schedule = anneal_fraction, schedule

    def forward(self, outputs, batch):
        return kl_weight(batch.get("progress"), self.anneal_fraction, self.schedule) * super().forward(outputs, batch)


class KLNats(Metric):
    """The un-annealed KL(q(z|x) || N(0, I)) in nats per sentence (the term above is scaled during warm-up)."""

    def forward(self, outputs, batch):
        return GaussianKL.forward(None, outputs, batch)


class TokenAccuracy(Metric):
    """Teacher-forced next-token accuracy over words and EOS."""

    def forward(self, outputs, batch):
        x = batch["x"]
        mask = token_mask(x)
        return ((outputs["logits"].argmax(-1) == x) & mask).sum() / mask.sum()
