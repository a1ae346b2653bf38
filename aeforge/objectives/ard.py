"""ARD-VAE's KL term: KL(N(mu, diag sigma^2) || N(0, diag sigma_hat^2)) with the data-estimated prior variance
sigma_hat^2 the model returns as `prior_var` (a constant of the loss: detached)."""

from __future__ import annotations

from aeforge.objectives import LossTerm


class ARDPriorKL(LossTerm):
    """1/2 sum_l [log s_l^2 - log sigma_l^2 + (sigma_l^2 + mu_l^2) / s_l^2 - 1], summed over latent axes and
    averaged over the batch (card section 0/4). With s^2 = 1 it is the N(0, I) KL."""

    def forward(self, outputs, batch):
        mu, logvar = outputs["mu"].float(), outputs["logvar"].float()
        prior_var = outputs["prior_var"].detach().float()
        kl = prior_var.log() - logvar + (logvar.exp() + mu.pow(2)) / prior_var - 1
        return 0.5 * kl.sum(1).mean()
