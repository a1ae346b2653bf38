"""Small objects the tests plug into configs through `_target_`."""

from __future__ import annotations

import errno
import io
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
    """Sends this process `sig` once `at_step` optimizer steps are done (simulates a preemption; SIGKILL and
    SIGSTOP a dead or frozen rank). A list gives each rank its own step (`at_step=[2,5]`: rank 0 after step 2,
    rank 1 after step 5; null: never on that rank)."""

    def __init__(self, at_step: int | list, sig: str = "SIGTERM"):
        self.at_step, self.sig = at_step, sig
        self._sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.at_step
        if not isinstance(step, int):
            step = list(step)[trainer.global_rank] if trainer.global_rank < len(step) else None
        # once: with gradient accumulation several batches end on the same global step
        if not self._sent and trainer.global_step == step:
            self._sent = True
            os.kill(os.getpid(), getattr(signal, self.sig))


class NaNAfter(pl.Callback):
    """Poisons the weights after `at_step` steps so the next loss is NaN."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


class KillAt(pl.Callback):
    """SIGKILLs this process (no handler, no cleanup: the OOM killer, a node failure) at the first moment of
    `phase` once `at_step` optimizer steps are done:
    - "step": mid-step, after the backward pass and before the optimizer step (step `at_step + 1`);
    - "validation": mid-validation, after its first batch;
    - "checkpoint": mid-write of the next checkpoint file, half of it written to the temp file."""

    def __init__(self, at_step: int, phase: str = "step"):
        if phase not in ("step", "validation", "checkpoint"):
            raise ValueError(f"phase must be step, validation or checkpoint, got {phase!r}")
        self.at_step, self.phase = at_step, phase

    def _kill(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    # ">=" rather than "==": a resumed run that starts past `at_step` still dies at its first chance
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.phase == "step" and trainer.global_step >= self.at_step:
            self._kill()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.phase == "validation" and not trainer.sanity_checking and trainer.global_step >= self.at_step:
            self._kill()

    def setup(self, trainer, pl_module, stage):
        if self.phase != "checkpoint":
            return
        ckpt_io, callback = trainer.strategy.checkpoint_io, self
        write = ckpt_io.write

        def killing_write(checkpoint, f):
            if trainer.global_step < callback.at_step:
                return write(checkpoint, f)
            buf = io.BytesIO()
            write(checkpoint, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())  # the half file is on disk, as after a kill during a long write
            callback._kill()

        ckpt_io.write = killing_write


class FailWrite(pl.Callback):
    """Makes every checkpoint write from `at_step` on fail with OSError(errno) after writing a few bytes (a full
    disk: ENOSPC)."""

    def __init__(self, at_step: int, errno_name: str = "ENOSPC"):
        self.at_step, self.code = at_step, getattr(errno, errno_name)

    def setup(self, trainer, pl_module, stage):
        ckpt_io, callback = trainer.strategy.checkpoint_io, self
        write = ckpt_io.write

        def failing_write(checkpoint, f):
            if trainer.global_step < callback.at_step:
                return write(checkpoint, f)
            f.write(b"PK\x03\x04 partial")
            raise OSError(callback.code, os.strerror(callback.code))

        ckpt_io.write = failing_write


class NonFiniteAt(pl.Callback):
    """Makes step `at_step`'s training loss (where="loss") or one of its gradients (where="grad") NaN or Inf, for
    that step only: the weights stay finite, so a skipped step can be recovered from."""

    def __init__(self, at_step: int, where: str = "loss", value: float = float("nan")):
        self.at_step, self.where, self.value = at_step, where, value

    def _now(self, trainer, pl_module) -> bool:
        return pl_module.training and trainer.global_step == self.at_step

    def setup(self, trainer, pl_module, stage):
        if self.where == "loss":
            def poison(module, args, out):
                return {**out, "loss": out["loss"] * self.value} if self._now(trainer, pl_module) else out

            pl_module.objective.register_forward_hook(poison)

    def on_after_backward(self, trainer, pl_module):
        if self.where == "grad" and self._now(trainer, pl_module):
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = self.value
