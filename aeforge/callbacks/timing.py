"""Training throughput: optimizer steps (and samples) per second after a warm-up, logged and kept."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


class StepTimer(pl.Callback):
    """Times optimizer steps after `warmup` steps; logged as train/steps_per_s at each epoch end and left
    in metrics.json as `train/steps_per_s` and `train/samples_per_s` (what the benchmarks read)."""

    def __init__(self, warmup: int = 10):
        self.warmup = warmup
        self.t0: float | None = None
        self.steps = self.samples = 0
        self.steps_per_s = self.samples_per_s = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.t0, self.steps, self.samples = time.perf_counter(), 0, 0
        elif self.t0 is not None:
            self.steps += 1
            x = batch.get("x") if isinstance(batch, dict) else None
            self.samples += len(x) if x is not None else 0
            dt = time.perf_counter() - self.t0
            self.steps_per_s, self.samples_per_s = self.steps / dt, self.samples / dt

    def on_train_epoch_end(self, trainer, pl_module):
        if self.steps:
            pl_module.log("train/steps_per_s", self.steps_per_s, on_epoch=True, sync_dist=False)

    def on_train_end(self, trainer, pl_module):
        if self.steps:  # train.run copies callback_metrics into metrics.json
            trainer.callback_metrics["train/steps_per_s"] = torch.tensor(self.steps_per_s)
            trainer.callback_metrics["train/samples_per_s"] = torch.tensor(self.samples_per_s)
