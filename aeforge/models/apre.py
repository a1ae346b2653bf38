"""Tabular autoencoders for outlier detection (APRE + MSS, Tan et al., arXiv 2304.00709; card 12).

- `TabularAE`: the dense AE, widths from the APRE code's rule by input dim (`width_rule`) or given (the
  PyOD-style [64, 32] with dropout and batch norm); scored by the squared reconstruction error.
- `ProbabilisticAE` (PAE): the same AE whose last layer gives a mean and a variance per feature
  (σ² = softplus(s)); trained with the Gaussian NLL (PRE) and scored by the adjustable error
  APRE_{α,β}(x, t) = α Σ_j (μ_j − t_j)² / (σ_j² + ε) + β Σ_j log(σ_j² + ε).
- `TabularVAE`: the Gaussian VAE on tables (widths from the same rule), scored by reconstruction error.

Every model's `anomaly_score(batch)` compares the output with `batch["target"]` when the batch has one — the
k-NN mean-shifted input that MSS (aeforge/eval/mss.py) puts there — else with `batch["x"]`; the model's input
stays the original x either way (`score_target = True` declares that contract)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from aeforge.models.base import AutoencoderModel
from aeforge.models.vae import GaussianVAE
from aeforge.objectives.apre import gaussian_nll_terms  # one formula for the loss and the score


def width_rule(d: int) -> tuple[list[int], int]:
    """(hidden widths, latent width) of the APRE code's AE for input dim d (rounded, at least 1)."""
    def w(f: float) -> int:
        return max(1, round(d * f))

    if d < 20:
        return [], max(1, math.ceil(d / 2))
    if d < 100:
        return [w(1 / 2)], w(1 / 4)
    if d < 200:
        return [w(1 / 2), w(1 / 4)], w(1 / 8)
    return [w(1 / 2), w(1 / 4)], w(1 / 16)


def dense(dims: list[int], last_act: bool, dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear layers with ReLU (and optional batch norm / dropout) after each but, unless last_act, the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_act:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers.append(nn.ReLU())
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers)


def score_target(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What an anomaly score compares the output with: MSS's shifted input when present, else the input."""
    return batch.get("target", batch["x"]).flatten(1).float()


class TabularAE(AutoencoderModel):
    """Dense AE; hidden_dims / latent_dim null: the APRE width rule (ReLU after every encoder layer, latent
    included; none after the decoder's last)."""

    modality = "tabular"
    score_target = True

    def __init__(self, input_shape: tuple[int, ...], hidden_dims: list[int] | None = None,
                 latent_dim: int | None = None, dropout: float = 0.0, batch_norm: bool = False,
                 latent_activation: bool = True):
        super().__init__()
        self.d = math.prod(tuple(input_shape))
        rule_hidden, rule_latent = width_rule(self.d)
        self.hidden_dims = list(rule_hidden if hidden_dims is None else hidden_dims)
        self.latent_dim = rule_latent if latent_dim is None else latent_dim
        self.encoder = dense([self.d, *self.hidden_dims, self.latent_dim], latent_activation, dropout, batch_norm)
        self.decoder = dense([self.latent_dim, *reversed(self.hidden_dims), self.out_dim], False, dropout,
                             batch_norm)

    @property
    def out_dim(self) -> int:
        return self.d

    def encode(self, batch):
        return self.encoder(batch["x"].flatten(1).float())

    def forward(self, batch):
        z = self.encode(batch)
        return {"z": z, "recon": self.decoder(z)}

    @torch.no_grad()
    def anomaly_score(self, batch) -> torch.Tensor:
        return (self(batch)["recon"] - score_target(batch)).pow(2).sum(1)


class ProbabilisticAE(TabularAE):
    """PAE: the decoder's last layer gives [μ, s] (2d); σ² = softplus(s). alpha / beta weight APRE's two
    terms at scoring time only (training uses the plain NLL, α = β = 1; the code's scoring default 0.5 / 2)."""

    def __init__(self, input_shape: tuple[int, ...], hidden_dims: list[int] | None = None,
                 latent_dim: int | None = None, dropout: float = 0.0, batch_norm: bool = False,
                 latent_activation: bool = True, alpha: float = 0.5, beta: float = 2.0):
        super().__init__(input_shape, hidden_dims, latent_dim, dropout, batch_norm, latent_activation)
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"model.alpha={alpha}, model.beta={beta}: both >= 0 and not both 0")
        self.alpha, self.beta = alpha, beta

    @property
    def out_dim(self) -> int:
        return 2 * self.d

    def forward(self, batch):
        z = self.encode(batch)
        mu, s = self.decoder(z).chunk(2, dim=1)
        return {"z": z, "recon": mu, "var": F.softplus(s)}

    @torch.no_grad()
    def error_terms(self, batch) -> torch.Tensor:
        """(B, 2): [Σ_j (μ_j − t_j)² / (σ_j² + ε), Σ_j log(σ_j² + ε)], APRE's two terms before weighting."""
        out = self(batch)
        return torch.stack(gaussian_nll_terms(out["recon"], out["var"], score_target(batch)), 1)

    def anomaly_score(self, batch) -> torch.Tensor:
        terms = self.error_terms(batch)
        return self.alpha * terms[:, 0] + self.beta * terms[:, 1]


class TabularVAE(GaussianVAE):
    """Gaussian VAE on tables: hidden_dims / latent_dim null take the APRE width rule (the rule's hidden
    widths, or [latent] for d < 20, as the VAE needs one hidden layer before its Gaussian head)."""

    modality = "tabular"
    score_target = True

    def __init__(self, input_shape: tuple[int, ...], hidden_dims: list[int] | None = None,
                 latent_dim: int | None = None, activation: str = "relu"):
        rule_hidden, rule_latent = width_rule(math.prod(tuple(input_shape)))
        latent = rule_latent if latent_dim is None else latent_dim
        hidden = list(hidden_dims) if hidden_dims is not None else (rule_hidden or [latent])
        super().__init__(input_shape, hidden, latent, activation)
