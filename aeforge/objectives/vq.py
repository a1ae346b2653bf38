"""Loss terms of the vector-quantised tokenizer (`model=vq_tokenizer`): the codebook and commitment losses
of VQ-VAE (van den Oord et al., 2017) and two metrics (perplexity, codebook usage).
outputs: `z_e` (B, N, D) encoder vectors as quantised, `z_q` (B, N, D) the chosen codes, `codes` ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeforge.objectives import LossTerm, Metric


class CodebookLoss(LossTerm):
    """||sg(z_e) - z_q||^2: moves the chosen codes towards the encoder outputs (only the codebook learns)."""

    def forward(self, outputs, batch):
        return F.mse_loss(outputs["z_q"].float(), outputs["z_e"].detach().float())


class CommitmentLoss(LossTerm):
    """||z_e - sg(z_q)||^2: keeps the encoder close to its chosen codes (beta = 0.25 in VQ-VAE)."""

    def __init__(self, weight: float = 0.25):
        super().__init__(weight)

    def forward(self, outputs, batch):
        return F.mse_loss(outputs["z_e"].float(), outputs["z_q"].detach().float())


def code_histogram(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    return torch.bincount(codes.flatten(), minlength=num_codes).float()


class CodebookPerplexity(Metric):
    """exp(entropy) of the code histogram of the batch (K when every code is used equally, 1 at collapse).
    A metric, per batch, so bounded by the number of positions in a batch."""

    def forward(self, outputs, batch):
        with torch.no_grad():
            p = code_histogram(outputs["codes"], 0)
            p = p / p.sum()
            return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class CodebookUsage(Metric):
    """Fraction of the K codes chosen at least once in the batch (a metric)."""

    def __init__(self, num_codes: int = 512):
        super().__init__()
        self.num_codes = num_codes

    def forward(self, outputs, batch):
        with torch.no_grad():
            return (code_histogram(outputs["codes"], self.num_codes) > 0).float().mean()
