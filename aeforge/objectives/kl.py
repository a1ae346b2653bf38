"""KL divergences for latent-variable models."""

from __future__ import annotations

from aeforge.objectives import LossTerm


class GaussianKL(LossTerm):
    """KL(N(mu, diag exp(logvar)) || N(0, I)), summed over latent dims, averaged over the batch."""

    def forward(self, outputs, batch):
        mu, logvar = outputs["mu"].float(), outputs["logvar"].float()
        return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
