"""Deterministic autoencoders: fully connected and convolutional."""

from __future__ import annotations

import math

import torch

from aeforge.models.base import AutoencoderModel
from aeforge.nn.conv import ConvDecoder, ConvEncoder
from aeforge.nn.mlp import mlp


class MLPAutoencoder(AutoencoderModel):
    def __init__(
        self, input_shape: tuple[int, ...], hidden_dims: list[int], latent_dim: int, activation: str = "relu"
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        d = math.prod(self.input_shape)
        self.encoder = mlp([d, *hidden_dims, latent_dim], activation)
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), d], activation)

    def encode(self, batch):
        return self.encoder(batch["x"].flatten(1))

    def forward(self, batch):
        z = self.encode(batch)
        return {"z": z, "recon": self.decoder(z).view(-1, *self.input_shape)}

    score_target = True  # anomaly_score compares with batch["target"] (MSS's shifted input) when given

    @torch.no_grad()
    def anomaly_score(self, batch) -> torch.Tensor:
        """Squared reconstruction error per sample (higher = more anomalous), against batch["target"] or x."""
        target = batch.get("target", batch["x"])
        return (self(batch)["recon"] - target).flatten(1).pow(2).sum(1)


class ConvAutoencoder(AutoencoderModel):
    def __init__(self, input_shape: tuple[int, int, int], channels: list[int], latent_dim: int):
        super().__init__()
        self.encoder = ConvEncoder(tuple(input_shape), channels, latent_dim)
        self.decoder = ConvDecoder(tuple(input_shape), channels, latent_dim)

    def encode(self, batch):
        return self.encoder(batch["x"])

    def forward(self, batch: dict[str, torch.Tensor]):
        z = self.encode(batch)
        return {"z": z, "recon": self.decoder(z)}





class DenoisingAutoencoder(MLPAutoencoder):
    """Denoising AE (Vincent et al. 2008): encode a corrupted input, reconstruct the clean one.
    Corruption only while training; `encode` sees clean inputs, so probes measure the learned features."""

    def __init__(self, input_shape: tuple[int, ...], hidden_dims: list[int], latent_dim: int,
                 activation: str = "relu", noise_std: float = 0.5):
        super().__init__(input_shape, hidden_dims, latent_dim, activation)
        self.noise_std = noise_std

    def forward(self, batch):
        x = batch["x"]
        noisy = x + self.noise_std * torch.randn_like(x) if self.training else x
        z = self.encoder(noisy.flatten(1))
        return {"z": z, "recon": self.decoder(z).view(-1, *self.input_shape)}
