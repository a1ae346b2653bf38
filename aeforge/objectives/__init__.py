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
        values = {}
        for name, term in self.terms.items():
            try:
                values[name] = term(outputs, batch)
            except KeyError as e:
                # a term reading an output the model does not produce: the objective does not fit the model
                if e.args and (e.args[0] in outputs or e.args[0] in batch):
                    raise
                raise KeyError(
                    f"objective term {name!r} ({type(term).__name__}) needs {e.args[0]!r}, which this model's outputs "
                    f"{sorted(outputs)} and the batch {sorted(batch)} do not have: the objective does not match the "
                    f"model (drop the objective= override to get the one the model config names)"
                ) from None
        loss = sum(self.terms[name].weight * v for name, v in values.items())
        return {"loss": loss, **values}
