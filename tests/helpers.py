"""Small objects the tests plug into configs through `_target_`."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl
import torch

from aeforge.models.base import AutoencoderModel


class GraphOnlyModel(AutoencoderModel):
    """Stands in for a model that needs graph data (modality check)."""

    modality = "graph"

    def __init__(self, input_shape=None, hidden: int = 8):
        super().__init__()
        self.lin = torch.nn.Linear(1, hidden)


class SignalAtStep(pl.Callback):
    """Sends this process `sig` once `at_step` optimizer steps are done (simulates a preemption)."""

    def __init__(self, at_step: int, sig: str = "SIGTERM"):
        self.at_step, self.sig = at_step, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), getattr(signal, self.sig))


class NaNAfter(pl.Callback):
    """Poisons the weights after `at_step` steps so the next loss is NaN."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))
