"""PHG-MAE's semi-supervision: rounds of pseudo-labels from the model's K-mask ensemble on the unlabelled
training frames of `VideoModalitiesDataModule`."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from aeforge.data.video_modalities import VideoFrames
from aeforge.objectives.multimodal import NO_LABEL

log = logging.getLogger("aeforge")


class PseudoLabelRounds(pl.Callback):
    """PHG-MAE semi-supervision [A: "pseudo-labels from the ensemble on unlabeled frames"; schedule OPEN]:
    at the end of every `every_n_epochs`-th epoch the model's K-mask ensemble (`predict_semantic`, k, mode)
    labels every unlabelled training frame; the following epochs use those maps as targets (and as the
    maskable semantic input) like labelled frames. 0 turns it off; data with every frame labelled has
    nothing to do. Pixels whose ensemble probability is below `min_confidence` stay unlabelled (ignored by
    the loss; 0 keeps every pixel). Logs pseudo/acc (agreement of the kept pixels with the true maps, known
    here: the target is procedural) and pseudo/coverage (fraction of pixels kept). The maps travel in
    checkpoints, so a resumed run keeps them."""

    def __init__(self, every_n_epochs: int = 10, k: int = 16, mode: str = "random", min_confidence: float = 0.0,
                 batch_size: int = 64, seed: int = 0):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: off), got {every_n_epochs}")
        if not 0 <= min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        self.every, self.k, self.mode, self.batch_size, self.seed = every_n_epochs, k, mode, batch_size, seed
        self.min_confidence = min_confidence
        self._restored: torch.Tensor | None = None
        self._last: VideoFrames | None = None

    @staticmethod
    def _frames(trainer) -> VideoFrames | None:
        ds = getattr(trainer.datamodule, "train_set", None)
        return ds if isinstance(ds, VideoFrames) and ds.pseudo is not None else None

    def on_train_start(self, trainer, pl_module):
        ds = self._frames(trainer)
        if ds is not None and self._restored is not None:
            ds.pseudo.copy_(self._restored)
        self._restored = None

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module):
        ds = self._frames(trainer)
        if not self.every or ds is None or (trainer.current_epoch + 1) % self.every:
            return
        dm, model, dev = trainer.datamodule, pl_module.model, pl_module.device
        idx = (~ds.labeled.bool()).nonzero().flatten()
        # the same masks on every rank (identical weights after the step): the ranks write identical maps
        g = torch.Generator(device=dev).manual_seed(self.seed + trainer.current_epoch)
        was_training = model.training
        model.eval()
        agree = kept = 0
        try:
            for chunk in idx.split(self.batch_size):
                batch = dm.make(ds.frames[chunk].to(dev))
                conf, pred = model.predict_semantic(batch, k=self.k, mode=self.mode, generator=g).max(1)
                keep = conf >= self.min_confidence
                ds.pseudo[chunk] = torch.where(keep, pred, NO_LABEL).to(torch.uint8).cpu()
                agree += (keep & (pred == batch["sem"])).sum().item()
                kept += keep.sum().item()
        finally:
            model.train(was_training)
        acc, coverage = agree / max(kept, 1), kept / max(ds.pseudo[idx].numel(), 1)
        pl_module.log_dict({"pseudo/acc": acc, "pseudo/coverage": coverage}, sync_dist=False)
        log.info("pseudo-labels: %d unlabelled frames relabelled by a %d-mask ensemble: %.3f of the pixels kept "
                 "(confidence >= %g), agreeing with the true maps on %.3f", len(idx), self.k, coverage,
                 self.min_confidence, acc)

    def state_dict(self) -> dict:
        return {"pseudo": self._last.pseudo.clone()} if self._last is not None else {}

    def setup(self, trainer, pl_module, stage: str):
        self._last = self._frames(trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("pseudo")
