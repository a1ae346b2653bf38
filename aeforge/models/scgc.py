"""SCGC / SCGC* (Kulatilleke et al. 2022): an MLP autoencoder whose embedding is clustered by DEC-style
self-training, while the graph enters only through the neighbour-contrastive loss (objectives/clustering).

- encoder d-500-500-2000-10 and mirror decoder, as SDCN's AE (ReLU between layers, none on z or x̂);
- cluster centres μ (K × n_z), Student-t soft assignment q (v = 1), DEC target distribution p;
- SCGC* (`decoder: false`) keeps encoder + μ only, half the parameters.

The weights and μ a run starts from come from the `scgc_pretrain` stage (aeforge/stages/scgc.py: AE
pre-training + k-means); the loop (P each epoch, per-epoch metrics) is `SCGCModule` (aeforge/modules/scgc.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn.mlp import mlp


def student_t(z: torch.Tensor, centres: torch.Tensor, v: float = 1.0) -> torch.Tensor:
    """q_ij ∝ (1 + ||z_i - μ_j||² / v)^(-(v+1)/2), rows normalised (DEC)."""
    d2 = torch.cdist(z, centres).pow(2) if z.shape[0] > 4096 else (z[:, None] - centres[None]).pow(2).sum(-1)
    q = (1.0 + d2 / v).pow(-(v + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """p_ij = (q_ij² / f_j) / Σ_j' (q_ij'² / f_j'), f_j = Σ_i q_ij: sharpened and frequency-balanced."""
    w = q.pow(2) / q.sum(0)
    return w / w.sum(1, keepdim=True)


@torch.no_grad()
def encode_all(encoder: nn.Module, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """z for every node, in chunks (so 10^5-10^6 nodes fit)."""
    return torch.cat([encoder(x[s : s + chunk]) for s in range(0, len(x), chunk)])


def encoder_decoder(dims: list[int], decoder: bool = True) -> tuple[nn.Sequential, nn.Sequential | None]:
    """SDCN's AE through dims = [d, *hidden, n_z]: encoder, then (if `decoder`) its mirror, built in this
    order so that a seeded construction draws the same initial weights wherever it happens."""
    enc = mlp(dims, "relu")
    return enc, mlp(dims[::-1], "relu") if decoder else None


class SCGC(AutoencoderModel):
    modality = "graph"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden_dims: list[int] = (500, 500, 2000),
        latent_dim: int = 10,
        decoder: bool = True,
        n_clusters: int | None = None,
        student_v: float = 1.0,
        num_classes: int | None = None,
    ):
        """decoder: false gives SCGC* (trimmed). n_clusters: null = the data's number of classes (`num_classes`,
        passed by the pipeline from the DataModule)."""
        super().__init__()
        self.dims = [int(np.prod(input_shape)), *hidden_dims, latent_dim]
        self.encoder, self.decoder = encoder_decoder(self.dims, decoder)
        self.student_v = student_v
        self.centres: nn.Parameter | None = None
        # 1 once the pretrain stage has set the weights and μ; checkpointed, so a resumed run carries it
        self.register_buffer("initialised", torch.zeros((), dtype=torch.uint8))
        n_clusters = n_clusters or num_classes
        if not n_clusters:
            raise ValueError("SCGC needs model.n_clusters or labelled data to size the cluster layer")
        self.centres = nn.Parameter(torch.empty(int(n_clusters), self.dims[-1]))
        nn.init.xavier_normal_(self.centres)

    # -- contract -----------------------------------------------------------------------------------
    def encode(self, batch) -> torch.Tensor:
        return self.encoder(batch["x"])

    def soft_assignment(self, z: torch.Tensor) -> torch.Tensor:
        return student_t(z, self.centres, self.student_v)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        z = self.encode(batch)
        out = {"z": z, "q": self.soft_assignment(z)}
        if self.decoder is not None:
            out["recon"] = self.decoder(z)
        return out

    def reconstruct(self, batch) -> torch.Tensor:
        if self.decoder is None:
            raise AttributeError("SCGC* has no decoder")
        return self.decoder(self.encode(batch))

    @torch.no_grad()
    def predict_all(self, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Q for every node (chunked)."""
        return torch.cat([self.soft_assignment(self.encoder(x[s : s + chunk])) for s in range(0, len(x), chunk)])

    @torch.no_grad()
    def start_from(self, centres: torch.Tensor, encoder: dict | None = None, decoder: dict | None = None) -> None:
        """Take a start (the pretrain stage's): μ and, when given, AE weights (SCGC* keeps the encoder's)."""
        if encoder is not None:
            self.encoder.load_state_dict(encoder)
        if decoder is not None and self.decoder is not None:
            self.decoder.load_state_dict(decoder)
        self.centres.copy_(centres.to(self.centres))
        self.initialised.fill_(1)
