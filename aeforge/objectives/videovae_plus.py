"""VideoVAE+'s loss (card 3; the LDM / taming `LPIPSWithDiscriminator` form, 3-D):

    r    = |x - x_hat| + w_p * LPIPS(x, x_hat)          (LPIPS per frame, broadcast over that frame's pixels)
    nll  = sum_pixels (r / exp(s) + s) / B               (s: one learned scalar log-variance, init 0)
    KL   = sum KL(q(z | .) || N(0, I)) / B               (the final posterior: the temporal one for videos,
                                                          the spatial one for image batches)
    loss = nll + 1e-6 * KL  (+ 0.5 * lambda_adaptive * L_G from the adversarial term, under module=gan)

`s` is a parameter of the objective; AEModule / GANModule optimise objective parameters with the model's.
"""

from __future__ import annotations

import torch
from torch import nn

from aeforge.objectives import LossTerm


class LogVarNLL(LossTerm):
    """sum(r / exp(s) + s) / B with r = L1 + perceptual_weight * LPIPS (see the module docstring).
    `perceptual`: an LPIPS term (aeforge.objectives.perceptual.LPIPSLoss) giving the mean per-frame LPIPS, or
    None for L1 alone."""

    def __init__(
        self,
        weight: float = 1.0,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        key_pred: str = "recon",
        key_target: str = "x",
    ):
        super().__init__(weight)
        if perceptual is not None and not isinstance(perceptual, nn.Module):
            raise ValueError(f"objective LogVarNLL perceptual must be a loss-term node (_target_) or null, got "
                             f"{type(perceptual).__name__}")
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.key_pred, self.key_target = key_pred, key_target

    def forward(self, outputs, batch):
        pred, target = outputs[self.key_pred].float(), batch[self.key_target].float()
        if pred.shape != target.shape:
            raise ValueError(f"LogVarNLL: {self.key_pred} {tuple(pred.shape)} vs {self.key_target} "
                             f"{tuple(target.shape)}")
        b, n = pred.shape[0], pred[0].numel()
        r_sum = (pred - target).abs().sum()
        if self.perceptual is not None and self.perceptual_weight > 0:
            # a frame's LPIPS is added to each of its pixels: the sum over pixels is numel x the frame mean
            r_sum = r_sum + self.perceptual_weight * b * n * self.perceptual(outputs, batch).float()
        return (r_sum / self.logvar.exp() + b * n * self.logvar) / b


class PosteriorKL(LossTerm):
    """KL(N(mu, exp(logvar)) || N(0, I)) of the model's final posterior (`mu`, `logvar`: the temporal one for
    videos, the spatial one for images), summed over every latent element, averaged over the batch."""

    def forward(self, outputs, batch):
        mu, logvar = outputs["mu"].float(), outputs["logvar"].float()
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum() / mu.shape[0]
