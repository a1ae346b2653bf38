"""AU-detection F1 of the task head after every validation, for best-epoch selection (`callbacks=au_f1`)."""

from __future__ import annotations

import pytorch_lightning as pl

from aeforge.eval import EvalContext
from aeforge.eval.au_f1 import AUF1


class AUF1Monitor(pl.Callback):
    """After every validation, the AU-detection numbers of the multi-label task head on the val split (as AUF1,
    without a tuning split) logged as val/au/<name>: f1_at_0.5, f1_best_threshold, best_threshold, auc. A
    ModelCheckpoint on val/au/f1_best_threshold then keeps the best epoch by F1 (callbacks=au_f1 adds both):
    on the test fold that is the official code's selection (test-tuned, "paper protocol"), on a held-out
    validation split a clean one. Costs one more forward pass over the val split per validation."""

    def __init__(self, pred_key: str = "logits", label_key: str = "y", batch_size: int = 256):
        self.metric = AUF1(pred_key, label_key, tune_split=None)
        self.batch_size = batch_size

    def on_fit_start(self, trainer, pl_module):
        # fail before the first epoch rather than at its end
        batch = next(iter(trainer.datamodule.eval_dataloader("val", 2)))
        label_key = self.metric.label_key
        if label_key not in batch or batch[label_key].ndim != 2:
            got = tuple(batch[label_key].shape) if label_key in batch else f"no {label_key!r} (has {sorted(batch)})"
            raise ValueError(f"callbacks=au_f1 needs multi-hot labels batch[{label_key!r}] of shape (B, num_AUs); this "
                             f"data gives {got}. Single-label data: drop callbacks=au_f1")

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        ctx = EvalContext(model=pl_module.model, datamodule=trainer.datamodule, device=pl_module.device,
                          batch_size=self.batch_size, max_samples=None)
        pl_module.log_dict({f"val/au/{k}": v for k, v in self.metric(ctx).items()})
