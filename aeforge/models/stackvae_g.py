"""StackVAE-G (Li et al., AI Open 2022): a VAE whose encoder and decoder are shared by every channel of a
multivariate window (parameters do not grow with the channel count), with a learned sparse channel graph that
mixes the channel latents (one hop); and the dense window VAE it is compared with.

Method card: ../shared/methods/vae_video_generative.md §10. Input `x` (B, W, C); each channel's window (W,) is
encoded on its own to h_c (z,), the graph A (C, C) mixes h' = λ A h + (1 − λ) h, the posterior N(μ(h'), σ²(h'))
is sampled, and the shared decoder returns a Gaussian (x_μ, log σ_x²) per channel window. Anomaly score: the
squared error of the last step of the window, summed over channels, with z averaged over `mc_samples`
reparameterised draws (the card's inference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.models.vae import GaussianVAE
from aeforge.nn.mlp import mlp


def top_k_graph(m: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Row-normalised D^-1 (A_k + I) with A_raw = ReLU(tanh(α M Mᵀ)) (undirected) and A_k its k largest
    entries per row (the rest zero, no gradient through them)."""
    raw = F.relu(torch.tanh(alpha * m @ m.T))
    k = min(k, raw.shape[0])
    idx = raw.topk(k, dim=1).indices
    keep = torch.zeros_like(raw).scatter_(1, idx, 1.0)
    a = raw * keep + torch.eye(raw.shape[0], device=raw.device, dtype=raw.dtype)
    return a / a.sum(1, keepdim=True)


class StackVAEG(AutoencoderModel):
    modality = "timeseries"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden_dim: int = 200,
        latent_dim: int = 20,
        node_dim: int = 30,
        k: int = 10,
        alpha: float = 3.0,
        graph_mix: float = 0.5,
        graph: bool = True,
        mc_samples: int = 200,
        logvar_clamp: float = 30.0,
        activation: str = "relu",
    ):
        """input_shape: (W, C), from the DataModule. hidden_dim / latent_dim: the shared MLPs' width and z per
        channel (card: 200 / 20). node_dim, k, alpha, graph_mix: embedding size, neighbours kept per row, tanh
        saturation α, mixing weight λ (card: 30, 10, 3, 0.5). graph=false: no graph module (StackVAE, the
        paper's ablation). mc_samples: z draws averaged when scoring (card: 200). logvar_clamp: |log σ²| bound."""
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"StackVAEG needs input_shape (window, channels), got {tuple(input_shape)}")
        if not 0.0 <= graph_mix <= 1.0:
            raise ValueError(f"model.graph_mix={graph_mix} must be in [0, 1]")
        if mc_samples < 1:
            raise ValueError(f"model.mc_samples={mc_samples} must be >= 1")
        self.window, self.channels = int(input_shape[0]), int(input_shape[1])
        self.input_shape = (self.window, self.channels)
        self.k, self.alpha, self.graph_mix, self.use_graph = k, alpha, graph_mix, graph
        self.mc_samples, self.logvar_clamp = mc_samples, logvar_clamp
        # shared over channels: a channel's window is one row of a (B*C, W) batch
        self.encoder = mlp([self.window, hidden_dim, hidden_dim, latent_dim], activation)
        self.to_mu = nn.Linear(latent_dim, latent_dim)
        self.to_logvar = nn.Linear(latent_dim, latent_dim)
        self.decoder = mlp([latent_dim, hidden_dim, hidden_dim], activation, last_act=True)
        self.out_mu = nn.Linear(hidden_dim, self.window)
        self.out_logvar = nn.Linear(hidden_dim, self.window)
        # the graph learner is the only part whose size depends on C (C × node_dim embeddings)
        self.nodes = nn.Embedding(self.channels, node_dim)
        self.node_proj = nn.Linear(node_dim, node_dim)

    def adjacency(self) -> torch.Tensor:
        """The learned (C, C) row-normalised graph (identity without the graph module)."""
        if not self.use_graph:
            return torch.eye(self.channels, device=self.nodes.weight.device)
        m = torch.tanh(self.alpha * self.node_proj(self.nodes.weight))
        return top_k_graph(m, self.k, self.alpha)

    def posterior(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²), each (B, C, z), of windows x (B, W, C) under graph a."""
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"StackVAEG built for windows (W, C) = {self.input_shape}, got {tuple(x.shape[1:])}")
        h = self.encoder(x.transpose(1, 2))
        if self.use_graph:
            h = self.graph_mix * torch.einsum("ij,bjd->bid", a, h) + (1 - self.graph_mix) * h
        return self.to_mu(h), self.to_logvar(h).clamp(-self.logvar_clamp, self.logvar_clamp)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_μ, log σ_x²) as (B, W, C) from z (B, C, z)."""
        d = self.decoder(z)
        logvar = self.out_logvar(d).clamp(-self.logvar_clamp, self.logvar_clamp)
        return self.out_mu(d).transpose(1, 2), logvar.transpose(1, 2)

    def forward(self, batch):
        x = batch["x"].float()
        a = self.adjacency()
        mu, logvar = self.posterior(x, a)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        x_mu, x_logvar = self.decode(z)
        # the card's training output is a draw from p(x|z); the mean in eval
        sample = x_mu + torch.randn_like(x_mu) * (0.5 * x_logvar).exp() if self.training else x_mu
        graph_pred = torch.einsum("ij,bjw->biw", a, x.transpose(1, 2)).transpose(1, 2)
        return {"mu": mu.flatten(1), "logvar": logvar.flatten(1), "z": z.flatten(1), "recon": x_mu,
                "recon_sample": sample, "recon_logvar": x_logvar, "graph_pred": graph_pred}

    def encode(self, batch):
        return self.posterior(batch["x"].float(), self.adjacency())[0].flatten(1)

    @torch.no_grad()
    def reconstruct(self, batch) -> torch.Tensor:
        """x_μ decoded from z averaged over mc_samples posterior draws (≈ μ; the card's test-time estimate)."""
        mu, logvar = self.posterior(batch["x"].float(), self.adjacency())
        # the mean of S draws μ + σ ε_s is distributed exactly as μ + σ ε / √S: one draw, not S
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) / self.mc_samples**0.5
        return self.decode(z)[0]

    @torch.no_grad()
    def channel_scores(self, batch) -> torch.Tensor:
        """(B, C): squared error of the last step of each window, per channel."""
        return (batch["x"][:, -1].float() - self.reconstruct(batch)[:, -1]).pow(2)

    @torch.no_grad()
    def anomaly_score(self, batch) -> torch.Tensor:
        return self.channel_scores(batch).sum(1)


class WindowVAE(GaussianVAE):
    """The dense baseline: a Gaussian VAE over the flattened (W·C) window (parameters grow with C), scored by
    the same last-step squared error with z = μ."""

    modality = "timeseries"

    @torch.no_grad()
    def anomaly_score(self, batch) -> torch.Tensor:
        x = batch["x"].float()
        recon = self.decode(self.posterior(x)[0])
        return (x[:, -1] - recon[:, -1]).pow(2).sum(1)
