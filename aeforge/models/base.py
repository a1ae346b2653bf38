"""The contract every model follows (see docs/architecture.md).

- `modality`: the kind of data it needs ("image", "graph", "activations", ...); checked against the
  DataModule's `modality` before anything is built.
- `forward(batch) -> dict`: everything the objective needs (reconstructions, latents, masks, ...).
- `encode(batch) -> (B, D)`: features for probes and clustering evaluators.
- `reconstruct(batch) -> like batch["x"]`: for reconstruction metrics and image grids (optional).
- `no_weight_decay() -> set[str]`: extra parameter names to exclude from weight decay (optional).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def model_state_dict(checkpoint: Mapping) -> dict:
    """The model's weights from an aeforge Lightning checkpoint ('state_dict' with 'model.' keys, the
    module's `model` attribute) or a bare state dict, as it is."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


class AutoencoderModel(nn.Module):
    modality: str = "image"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)["recon"]
