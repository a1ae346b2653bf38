"""ARD-VAE (Saha, Joshi, Whitaker, WACV 2025): a VAE whose N(0, I) prior is replaced by an automatic relevance
determination prior p(z_l | alpha_l) = N(0, 1/alpha_l) with Gamma hyper-priors on the precisions; the
hyper-posterior is estimated from encoded training data every epoch, giving the per-axis prior variance
sigma_hat_l^2 = b_l / a_l. Unused axes collapse to a near-zero prior variance.

How the prior reaches the model: `aeforge/callbacks/ard_prior.py` (ARDPriorRefresh) encodes a random subset of the
training set at each epoch start and calls `model.set_prior(variance, epoch)`, a method of the model that owns
the `prior_var` buffer (checked shape, floored, saved in checkpoints). The callback never writes the buffer
itself, and the prior is a constant of the loss (no gradient), as in the paper. `forward` returns it as
`outputs["prior_var"]` for the KL term (aeforge/objectives/ard.py).

Two bodies: `ARDVAE` (the MLP GaussianVAE, for vectors and the synthetic check) and `ConvARDVAE` (the paper's
conv VAE [card: models/ae_model_MNIST.py]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.models.vae import GaussianVAE

LOGVAR_CLAMP = (-30.0, 20.0)


def hyper_prior_variance(z: torch.Tensor, a0: float = 0.0, b0: float = 0.0) -> torch.Tensor:
    """sigma_hat_l^2 = b_l / a_l with the conjugate Gamma update a_l = a0 + n/2, b_l = b0 + 1/2 sum_i z_il^2
    (prior mean 0); with a0 = b0 = 0 this is mean_i z_il^2. z: (n, L) posterior samples."""
    z = z.double()
    return ((b0 + 0.5 * z.pow(2).sum(0)) / (a0 + 0.5 * len(z))).float()


class ARDPriorMixin:
    """The ARD prior's state: `prior_var` (L,) and `prior_epoch` (the epoch it was estimated for, -1 before the
    first estimate: N(0, I)). Both are buffers, so a checkpoint carries them and a resumed run continues with
    the prior of its epoch."""

    def _init_prior(self, latent_dim: int, min_prior_var: float) -> None:
        if not min_prior_var > 0:
            raise ValueError(f"min_prior_var must be > 0, got {min_prior_var}")
        self.latent_dim, self.min_prior_var = latent_dim, min_prior_var
        self.register_buffer("prior_var", torch.ones(latent_dim))
        self.register_buffer("prior_epoch", torch.tensor(-1, dtype=torch.long))

    @torch.no_grad()
    def set_prior(self, variance: torch.Tensor, epoch: int) -> None:
        """Replace the prior variance (floored at min_prior_var against a division by zero in the KL)."""
        variance = torch.as_tensor(variance, dtype=self.prior_var.dtype, device=self.prior_var.device)
        if variance.shape != self.prior_var.shape or not torch.isfinite(variance).all():
            raise ValueError(f"set_prior: expected {tuple(self.prior_var.shape)} finite variances, "
                             f"got shape {tuple(variance.shape)}")
        self.prior_var.copy_(variance.clamp_min(self.min_prior_var))
        self.prior_epoch.fill_(int(epoch))

    def posterior_sample(self, mu, logvar, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * (0.5 * logvar).exp()

    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.posterior(x)
        z = self.posterior_sample(mu, logvar) if self.training else mu
        return {"mu": mu, "logvar": logvar, "z": z, "recon": self.decode(z), "prior_var": self.prior_var}

    @torch.no_grad()
    def sample(self, n: int, active: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded draws z ~ N(0, diag prior_var), with only the `active` axes (bool (L,)) varying when given."""
        std = self.prior_var.sqrt()
        if active is not None:
            std = std * active.to(std)
        return self.decode(torch.randn(n, self.latent_dim, device=std.device) * std)


class ARDVAE(ARDPriorMixin, GaussianVAE):
    """The MLP Gaussian VAE (aeforge/models/vae.py) with the ARD prior."""

    def __init__(self, input_shape: tuple[int, ...], hidden_dims: list[int], latent_dim: int,
                 activation: str = "relu", min_prior_var: float = 1e-6):
        GaussianVAE.__init__(self, input_shape, hidden_dims, latent_dim, activation)
        self._init_prior(latent_dim, min_prior_var)

    def posterior(self, x):
        mu, logvar = super().posterior(x)
        return mu, logvar.clamp(*LOGVAR_CLAMP)

    def forward(self, batch):
        return self._outputs(batch["x"])


class ConvARDVAE(ARDPriorMixin, AutoencoderModel):
    """The paper's conv VAE [card: ae_model_MNIST.py]. Encoder: 4 x [Conv k4 s2 (n, 2n, 4n, 8n) -> BN -> ReLU],
    flatten, Linear -> 2L (mu, log-variance). Decoder: Linear -> 8n x s x s, 3 x [ConvT k4 s2 (4n, 2n, n) -> BN ->
    ReLU], ConvT k4 s2 -> C, then sigmoid (`output: sigmoid`, data in [0, 1]) or nothing (`output: none`).
    Images are zero-padded to a multiple of 16 (MNIST 28 -> 32, as the paper) and the output cropped back.
    He-normal init."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, filters: int = 64, output: str = "sigmoid",
                 min_prior_var: float = 1e-6):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ConvARDVAE needs (C, H, W) images, got input_shape={tuple(input_shape)}")
        if output not in ("sigmoid", "none"):
            raise ValueError(f"ConvARDVAE.output must be 'sigmoid' or 'none', got {output!r}")
        self.input_shape, self.output = tuple(input_shape), output
        c, h, w = self.input_shape
        self.padded = (math.ceil(h / 16) * 16, math.ceil(w / 16) * 16)
        self.start = (8 * filters, self.padded[0] // 16, self.padded[1] // 16)
        widths = [filters, 2 * filters, 4 * filters, 8 * filters]
        enc: list[nn.Module] = []
        for cin, cout in zip([c, *widths[:-1]], widths):
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.to_stats = nn.Linear(math.prod(self.start), 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, math.prod(self.start))
        dec: list[nn.Module] = []
        for cin, cout in zip(widths[::-1][:-1], widths[::-1][1:]):
            dec += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(filters, c, 4, stride=2, padding=1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self._init_prior(latent_dim, min_prior_var)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.input_shape[1:]
        x = F.pad(x, (0, self.padded[1] - w, 0, self.padded[0] - h))
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_CLAMP)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.from_latent(z).view(-1, *self.start))
        out = out[..., : self.input_shape[1], : self.input_shape[2]]
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def encode(self, batch):
        return self.posterior(batch["x"])[0]

    def forward(self, batch):
        return self._outputs(batch["x"])
