"""A module that never leaves eval mode: frozen teachers and tokenizers inside a trainable model."""

from __future__ import annotations

from torch import nn


class FrozenModule(nn.Module):
    """`train()` keeps eval mode whatever the caller asks (BatchNorm statistics and dropout stay frozen when
    the enclosing model switches to training)."""

    def train(self, mode: bool = True):
        return super().train(False)
