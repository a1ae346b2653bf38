"""Objectives: a weighted sum of named loss terms. Each term is logged under its own name."""

from __future__ import annotations

import torch
from torch import nn


class LossTerm(nn.Module):
    """One named loss term: `forward(outputs, batch) -> scalar tensor`, scaled by `weight` in the sum."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight


class Objective(nn.Module):
    def __init__(self, terms: dict[str, LossTerm]):
        super().__init__()
        if not terms:
            raise ValueError("objective.terms is empty: an objective needs at least one loss term")
        self.terms = nn.ModuleDict(terms)

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        values = {name: term(outputs, batch) for name, term in self.terms.items()}
        loss = sum(self.terms[name].weight * v for name, v in values.items())
        return {"loss": loss, **values}
