"""Objectives: a weighted sum of named loss terms, plus named metrics that are logged and never summed.
Each term and each metric is logged under its own name (train|val/<name>)."""

from __future__ import annotations

import torch
from torch import nn


class LossTerm(nn.Module):
    """One named loss term: `forward(outputs, batch) -> scalar tensor`, scaled by `weight` in the sum."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight


class Metric(nn.Module):
    """A logged value of (outputs, batch) that is not a loss (accuracy, codebook perplexity, …):
    `forward(outputs, batch) -> scalar tensor`, computed without gradients, never part of the loss."""


class Objective(nn.Module):
    """`terms`: the loss, sum of weight × term; `metrics`: logged beside it (objective.metrics.<name>)."""

    def __init__(self, terms: dict[str, LossTerm], metrics: dict[str, Metric] | None = None):
        super().__init__()
        if not terms:
            raise ValueError("objective.terms is empty: an objective needs at least one loss term")
        metrics = metrics or {}
        clash = sorted(set(terms) & set(metrics))
        if clash:
            raise ValueError(f"objective.terms and objective.metrics share the name(s) {clash}: logs would mix them")
        self.terms = nn.ModuleDict(terms)
        self.metrics = nn.ModuleDict(metrics)

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        values = {name: self._call(name, term, outputs, batch) for name, term in self.terms.items()}
        loss = sum(self.terms[name].weight * v for name, v in values.items())
        with torch.no_grad():
            metrics = {name: self._call(name, m, outputs, batch) for name, m in self.metrics.items()}
        return {"loss": loss, **values, **metrics}

    @staticmethod
    def _call(name: str, term: nn.Module, outputs: dict, batch: dict) -> torch.Tensor:
        try:
            return term(outputs, batch)
        except KeyError as e:
            # a term reading an output the model does not produce: the objective does not fit the model
            if e.args and (e.args[0] in outputs or e.args[0] in batch):
                raise
            raise KeyError(
                f"objective term {name!r} ({type(term).__name__}) needs {e.args[0]!r}, which this model's outputs "
                f"{sorted(outputs)} and the batch {sorted(batch)} do not have: the objective does not match the "
                f"model (drop the objective= override to get the one the model config names)"
            ) from None
