"""SCGC's losses as LossTerms, and `SCGCObjective`, which assembles them from the paper's knobs
(α, β, τ, r, IAC) so that sweeps read `objective.tau=... objective.order=...`.

    SCGC:  L = β·KL(P‖Q) + α·L_NC + MSE(x̂, x)
    SCGC*: L = β·KL(P‖Q) + α·L_NC                 (IAC: Γ = Â + ... + Â^r instead of Â^r)

Γ itself is computed by the GraphDataModule (sparse, once); batches carry Γ[B, B] as `gamma_index`
(2, nnz) local indices and `gamma_value` (nnz,), and the DEC target P as `p` (added by SCGCModule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from aeforge.objectives import LossTerm, Objective


def _denominator_rows(zn: torch.Tensor, zn_all: torch.Tensor, start: int, tau: float) -> torch.Tensor:
    """Σ_j exp(τ s_ij) for rows start.. of zn, with s_ii := 0 (so the diagonal contributes exp(0) = 1).
    The diagonal is swapped out arithmetically rather than written into the N × N matrix: an index_put
    there costs a copy of the matrix for autograd (≈ 8 % of an ACM epoch, measured)."""
    row_sums = torch.exp(tau * (zn @ zn_all.T)).sum(1)
    s_ii = (zn * zn_all[start : start + len(zn)]).sum(1)
    return row_sums - torch.exp(tau * s_ii) + 1.0


# N × N entries computed at once when the chunk is automatic: 2^27 fp32 = 512 MiB per matrix, so USPS
# (9 298 nodes) runs unchunked: the loss alone measured 1.5-2.5x faster than in 4 096-row checkpointed chunks
AUTO_CHUNK_ENTRIES = 2**27


def neighbour_contrastive(
    z: torch.Tensor,
    gamma_index: torch.Tensor,
    gamma_value: torch.Tensor,
    tau: float,
    chunk: int | None = None,
) -> torch.Tensor:
    """Graph-MLP's Ncontrast as SCGC uses it:
        L = -(1/N) Σ_i log( Σ_j Γ_ij exp(τ s_ij) / Σ_j exp(τ s_ij) + 1e-8 ),
    s = cosine similarity with s_ii = 0, τ multiplying s (an inverse temperature, as in the code).

    Γ is sparse, so the numerator only touches its non-zeros; the denominator needs every pair. Beyond
    `chunk` rows it is computed in row chunks under activation checkpointing, so memory is chunk × N
    instead of the N × N matrices the original keeps for backward. chunk: null = automatic (all rows
    while N² ≤ AUTO_CHUNK_ENTRIES), 0 = never chunk."""
    # fp32 even under bf16 autocast (trainer.precision=bf16-mixed): exp(τ s) amplifies bf16's 3-digit cosines,
    # and the N × N product is a small share of the FLOPs next to the MLP's
    with torch.autocast(z.device.type, enabled=False):
        return _contrastive_fp32(z.float(), gamma_index, gamma_value.float(), tau, chunk)


def _contrastive_fp32(z, gamma_index, gamma_value, tau, chunk) -> torch.Tensor:
    n = z.shape[0]
    zn = F.normalize(z, dim=1)
    if chunk is None:
        chunk = max(1, AUTO_CHUNK_ENTRIES // n)
    if chunk <= 0 or n <= chunk:
        den = _denominator_rows(zn, zn, 0, tau)
    else:
        den = torch.cat([
            checkpoint(_denominator_rows, zn[s : s + chunk], zn, s, tau, use_reentrant=False)
            for s in range(0, n, chunk)
        ])
    i, j = gamma_index[0], gamma_index[1]
    s_ij = (zn[i] * zn[j]).sum(1)
    s_ij = torch.where(i == j, torch.zeros_like(s_ij), s_ij)
    num = torch.zeros(n, device=z.device, dtype=den.dtype)
    num = num.index_add_(0, i, gamma_value * torch.exp(tau * s_ij))
    return -torch.log(num / den + 1e-8).mean()


class NeighbourContrastive(LossTerm):
    """α·L_NC on outputs["z"] with the batch's Γ block. tau multiplies the cosine similarity."""

    def __init__(self, weight: float = 1.0, tau: float = 1.0, chunk: int | None = None):
        super().__init__(weight)
        self.tau, self.chunk = tau, chunk

    def forward(self, outputs, batch):
        gi, gv = batch["gamma_index"], batch["gamma_value"]
        return neighbour_contrastive(outputs["z"], gi, gv, self.tau, self.chunk)


class ClusterKL(LossTerm):
    """KL(P‖Q), batch mean (`kl_div(log Q, P, reduction="batchmean")`); P is a constant target that the
    training loop computes from the epoch-start Q of every node and hands over as batch["p"]."""

    def forward(self, outputs, batch):
        if "p" not in batch:
            raise RuntimeError("ClusterKL needs batch['p'], the DEC target distribution: train with module=scgc")
        return F.kl_div(outputs["q"].log(), batch["p"], reduction="batchmean")


class FeatureMSE(LossTerm):
    """SCGC's reconstruction: mean over all N·d entries of (x̂ - x)²."""

    def forward(self, outputs, batch):
        return F.mse_loss(outputs["recon"], batch["x"])


class SCGCObjective(Objective):
    """The paper's knobs in one place. recon: weight of the MSE term (SCGC 1, SCGC*: 0 drops it).
    order/cumulative define Γ, which the batches carry: the graph data configs take them from here
    (`order: ${objective.order}`), so a sweep over objective.order changes Γ."""

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 0.1,
        tau: float = 1.0,
        order: int = 2,
        cumulative: bool = False,
        recon: float = 1.0,
        chunk: int | None = None,
    ):
        if order < 1:
            raise ValueError(f"objective.order must be >= 1, got {order}")
        terms: dict[str, LossTerm] = {
            "kl": ClusterKL(weight=beta),
            "contrast": NeighbourContrastive(weight=alpha, tau=tau, chunk=chunk),
        }
        if recon:
            terms["recon"] = FeatureMSE(weight=recon)
        super().__init__(terms)
