"""Lightning's ModelCheckpoint with `last.ckpt` written at every save point, and no file written twice.

Lightning 2.6 writes `last.ckpt` at an epoch/validation end only when a top-k checkpoint was saved at the same
step. When the monitored metric does not improve (or `save_top_k=0`), `last.ckpt` stays at an older epoch:
`resume=auto` after a crash then redoes epochs, and the `last.ckpt` of a finished run can hold the best
epoch rather than the last one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from aeforge.callbacks.checkpointing import fsync_dir


def link_atomically(src: str, dst: str) -> None:
    """`dst` becomes a second name of `src`'s file (hard link, through a temp name and os.replace, so `dst` is
    the old file or the new one, never missing). Later atomic rewrites of either name create a new file and
    leave the other name on the old one. Where hard links are refused (some network filesystems): a copy."""
    tmp = dst + ".link.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)  # left by a crash between link and replace
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(Path(dst).parent)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Drop-in for `pytorch_lightning.callbacks.ModelCheckpoint` (same arguments)."""

    def _save_point(self, trainer, at_train_epoch_end: bool) -> bool:
        """Whether Lightning's own hook for this moment is an epoch save point (the test it runs itself)."""
        if self._should_skip_saving_checkpoint(trainer):
            return False
        if self._should_save_on_train_epoch_end(trainer) != at_train_epoch_end:
            return False
        return self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0

    def on_train_epoch_end(self, trainer, pl_module):
        due = self._save_point(trainer, at_train_epoch_end=True)
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, due)

    def on_validation_end(self, trainer, pl_module):
        due = self._save_point(trainer, at_train_epoch_end=False)
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, due)

    def _save_last_if_missed(self, trainer, due: bool) -> None:
        # Lightning skipped last.ckpt because no top-k file was written at this step
        if due and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        """When a top-k file was written at this very step, `last.ckpt` becomes a hard link to it: a full-size
        ViT-B checkpoint with Adam state is ~1.9 GB, ~9 s to write. The top-k file goes first (as in Lightning),
        so a crash in between leaves `last.ckpt` at an earlier step, from which the run replays the same
        steps exactly; `last.ckpt` never claims a best file that is not on disk yet."""
        written = self._last_checkpoint_saved
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        # every rank takes the same branch (a save may be a collective, e.g. FSDP): decide on state, not on files
        if (
            self.save_last is not True
            or self._enable_version_counter
            or not written
            or written == filepath
            or self._last_global_step_saved != trainer.global_step
            or not _is_local_file_protocol(filepath)
        ):
            return super()._save_last_checkpoint(trainer, monitor_candidates)
        previous, self.last_model_path = self.last_model_path, filepath
        if trainer.is_global_zero:
            link_atomically(written, filepath)
        trainer.strategy.barrier()
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)
