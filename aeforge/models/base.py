"""The contract every model follows (see docs/architecture.md).

- `modality`: the kind of data it needs ("image", "graph", "activations", ...); checked against the
  DataModule's `modality` before anything is built.
- `forward(batch) -> dict`: everything the objective needs (reconstructions, latents, masks, ...).
- `encode(batch) -> (B, D)`: features for probes and clustering evaluators.
- `reconstruct(batch) -> like batch["x"]`: for reconstruction metrics and image grids (optional).
- `no_weight_decay() -> set[str]`: extra parameter names to exclude from weight decay (optional).
- `on_train_step_end(step, total)`: state changes after each optimiser step (optional).

Run progress reaches a model only as `batch["progress"]` (a `RunProgress`, added by the LightningModule to
training and validation batches; absent in evaluators, where a model treats training as done). Nothing
outside a model sets its attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn


class RunProgress(NamedTuple):
    """Where the run is: `step` optimiser steps done of `total_steps`, in `epoch`; `fraction` = step / total,
    clipped to [0, 1]. The one sanctioned way for a model or a loss term to see run progress (warm-ups,
    schedules): read `batch.get("progress")`, never a value written into the model."""

    step: int
    total_steps: int
    epoch: int
    fraction: float

    @classmethod
    def of(cls, step: int, total_steps: int | float, epoch: int) -> RunProgress:
        total = max(int(total_steps), 1) if total_steps != float("inf") else 0
        return cls(int(step), total, int(epoch), min(step / total, 1.0) if total else 0.0)


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
