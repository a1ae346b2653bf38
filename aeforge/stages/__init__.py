"""Stages: work a run does once, after the model and the data are built and before `trainer.fit` (e.g. SCGC's
AE pre-training + k-means start). Each is a callable `stage(model, datamodule, ctx) -> dict[str, float]` chosen
by the `stages` config group; its numbers go into metrics.json. A resumed run skips them: the checkpoint
already holds what they produced. A stage has its own config, keeps its own cache and logs under its name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StageContext:
    run_dir: Path
    seed: int
    device: torch.device

    def logger(self, name: str) -> logging.Logger:
        return logging.getLogger(f"aeforge.stages.{name}")
