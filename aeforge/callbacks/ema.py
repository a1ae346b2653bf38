"""Exponential moving average of the model weights, swapped in for validation and kept in checkpoints."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class EMA(pl.Callback):
    def __init__(self, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None
        self._backup: dict[str, torch.Tensor] | None = None

    def _params(self, pl_module):
        return {k: p for k, p in pl_module.model.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module):
        if self.shadow is None:
            self.shadow = {k: p.detach().clone() for k, p in self._params(pl_module).items()}
        else:
            self.shadow = {k: v.to(pl_module.device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = self._params(pl_module)
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach() for k in keys], 1 - self.decay)

    def _swap(self, pl_module):
        params = self._params(pl_module)
        for k, v in self.shadow.items():
            tmp = params[k].detach().clone()
            params[k].data.copy_(v)
            self.shadow[k] = tmp

    def on_validation_start(self, trainer, pl_module):
        if self.shadow is not None and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.shadow is not None and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_fit_end(self, trainer, pl_module):
        # evaluation after fit uses the averaged weights
        if self.shadow is not None:
            self._swap(pl_module)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.shadow = state["decay"], state["shadow"]
