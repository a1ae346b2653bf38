"""The contract every model follows (see docs/architecture.md).

- `modality`: the kind of data it needs ("image", "graph", "activations", ...); checked against the
  DataModule's `modality` before anything is built.
- `forward(batch) -> dict`: everything the objective needs (reconstructions, latents, masks, ...).
- `encode(batch) -> (B, D)`: features for probes and clustering evaluators.
- `reconstruct(batch) -> like batch["x"]`: for reconstruction metrics and image grids (optional).
- `no_weight_decay() -> set[str]`: extra parameter names to exclude from weight decay (optional).
"""

from __future__ import annotations

import torch
from torch import nn


class AutoencoderModel(nn.Module):
    modality: str = "image"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)["recon"]
