"""Atomic checkpoint writes and a checkpoint on SIGTERM/SIGUSR1 (preemption, SLURM time limits)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<path>.tmp`, then rename: a crash mid-write never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or SIGUSR1, finish the current step, write `checkpoints/last.ckpt` and stop cleanly, so
    `resume=auto` continues from that exact step. Under SLURM, Lightning's own SIGUSR1 requeue handler is
    left in place (it saves and requeues); this callback then only handles SIGTERM."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name
        log.warning("received %s: will checkpoint after this step and stop", self.received)

    def on_train_start(self, trainer, pl_module):
        slurm = "SLURM_JOB_ID" in os.environ
        for name in self.signals:
            if slurm and name == "SIGUSR1":
                continue
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.received is None:
            return
        # every rank must agree to stop, or DDP hangs in the next collective
        stop = trainer.strategy.reduce_boolean_decision(True, all=False)
        if stop:
            ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "dirpath", None):
                    ckpt_dir = Path(cb.dirpath)
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")
            for cb in trainer.checkpoint_callbacks:
                # the epoch is cut short: an end-of-epoch/end-of-train save now would mark it complete
                cb._last_global_step_saved = trainer.global_step
                cb._last_checkpoint_saved = str(ckpt_dir / "last.ckpt")
            log.warning("checkpoint written to %s after %s; stopping", ckpt_dir / "last.ckpt", self.received)
            trainer.should_stop = True
            trainer.preempted = self.received  # read by aeforge.train to skip evaluation

    def on_train_end(self, trainer, pl_module):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
