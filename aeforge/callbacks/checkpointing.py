"""Atomic checkpoint writes and a checkpoint on SIGTERM/SIGUSR1 (preemption, SLURM time limits)."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol

from aeforge.checkpoints import CheckpointWriteError, load_checkpoint

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable: without it a power cut can undo an os.replace that already returned."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, mode: str):
    """Write `<path>.tmp`, fsync it, rename it over `path`, fsync the directory: `path` holds the old content
    or the new, never a prefix. On an OSError the temp file is removed (it would only fill the disk further)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """metrics.json and the like, read by sweepers and scripts while a run may be writing them."""
    with atomic_file(path, "w") as f:
        f.write(text)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<path>.tmp`, fsync it, rename it over `<path>`, fsync the directory: a crash or a full disk at
    any point leaves either the previous checkpoint or the new one, complete, under `<path>`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as f:
                self.write(checkpoint, f)
        except OSError as e:
            kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
            raise CheckpointWriteError(
                e.errno, f"could not write checkpoint {path}: {e.strerror or e}; {kept}; free space and continue "
                f"with resume=auto"
            ) from e

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Always tensors and plain containers, whatever Lightning asks (weights_only=None defaults to False
        there): reading a checkpoint must not run code. Errors name the file (aeforge/checkpoints.py)."""
        if not _is_local_file_protocol(str(path)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location or "cpu", what=f"resume={path}")

    def write(self, checkpoint: dict, f) -> None:
        """Serialise into the open temp file (straight to disk: no second in-memory copy of a GB checkpoint).
        Tests replace it to inject write errors and kills."""
        torch.save(checkpoint, f)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or SIGUSR1, finish the current step, write `checkpoints/last.ckpt` and stop cleanly, so
    `resume=auto` continues from that exact step. Under SLURM, Lightning's own SIGUSR1 requeue handler is
    left in place (it saves and requeues); this callback then only handles SIGTERM.

    With several processes the signal reaches the ranks at different steps (or only some of them), yet the
    decision and the save are collectives: every rank votes at the same optimizer steps, signalled or not,
    and all stop together as soon as any rank saw a signal. `every_n_steps` spaces the votes (one all-reduce
    of one number each); the stop then comes at most that many steps after the signal."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), every_n_steps: int = 1):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.signals = signals
        self.every_n_steps = every_n_steps
        self.received: str | None = None
        self._previous: dict = {}
        self._checked_step = -1

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name
        log.warning("received %s: will checkpoint after this step and stop", self.received)

    def on_train_start(self, trainer, pl_module):
        self._checked_step = trainer.global_step  # a resumed run votes on its next steps, not the restored one
        slurm = "SLURM_JOB_ID" in os.environ
        for name in self.signals:
            if slurm and name == "SIGUSR1":
                continue
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError as e:  # only the main thread may install handlers (some launchers run fit elsewhere)
                log.warning("preemption checkpoints are disabled: cannot install a %s handler (%s); this run "
                            "stops without a checkpoint when preempted", name, e)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        # act only right after an optimizer step: a checkpoint inside gradient accumulation would lose the
        # gradients accumulated so far
        if step == self._checked_step:
            return
        self._checked_step = step
        if trainer.world_size > 1:
            if step % self.every_n_steps:
                return
            # every rank reaches this at the same step whatever it received, so the all-reduce pairs up
            if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
                return
        elif self.received is None:
            return
        self._save_and_stop(trainer)

    def _save_and_stop(self, trainer):
        why = self.received or "a signal on another rank"
        ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                ckpt_dir = Path(cb.dirpath)
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")  # a collective: rank 0 writes, all wait
        for cb in trainer.checkpoint_callbacks:
            # the epoch is cut short: an end-of-epoch/end-of-train save now would mark it complete
            cb._last_global_step_saved = trainer.global_step
            cb._last_checkpoint_saved = str(ckpt_dir / "last.ckpt")
        log.warning("checkpoint written to %s after %s; stopping", ckpt_dir / "last.ckpt", why)
        trainer.should_stop = True
        trainer.preempted = why  # read by aeforge.train to skip evaluation

    def on_train_end(self, trainer, pl_module):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
