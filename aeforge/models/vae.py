"""Gaussian VAE (Kingma & Welling 2014); beta-VAE is the same model with the KL term weighted."""

from __future__ import annotations

import math

import torch
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn.mlp import mlp


class GaussianVAE(AutoencoderModel):
    def __init__(
        self, input_shape: tuple[int, ...], hidden_dims: list[int], latent_dim: int, activation: str = "relu"
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        d = math.prod(self.input_shape)
        self.encoder = mlp([d, *hidden_dims], activation, last_act=True)
        self.to_stats = nn.Linear(hidden_dims[-1], 2 * latent_dim)
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), d], activation)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(x.flatten(1))).chunk(2, dim=1)
        return mu, logvar

    def encode(self, batch):
        return self.posterior(batch["x"])[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.input_shape)

    def forward(self, batch):
        mu, logvar = self.posterior(batch["x"])
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return {"mu": mu, "logvar": logvar, "z": z, "recon": self.decode(z)}

    score_target = True  # anomaly_score compares with batch["target"] (MSS's shifted input) when given

    @torch.no_grad()
    def anomaly_score(self, batch) -> torch.Tensor:
        """Squared error of the posterior-mean reconstruction per sample, against batch["target"] or x."""
        target = batch.get("target", batch["x"])
        return (self(batch)["recon"] - target).flatten(1).pow(2).sum(1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.to_stats.out_features // 2, device=self.to_stats.weight.device)
        return self.decode(z)
