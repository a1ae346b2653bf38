"""Pictures people would rather look at than read: reconstruction grids and loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


class ReconstructionGrid(pl.Callback):
    """After each validation, saves `images/recon_epoch<E>.png` and `reconstructions.png` in the run dir:
    row pairs of inputs (top) and reconstructions (bottom) of the first val batch; also sent to
    TensorBoard / W&B when those loggers are on."""

    def __init__(self, num_images: int = 16):
        self.num_images = num_images
        self._batch = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and "x" in batch and batch["x"].ndim == 4:
            self._batch = {k: v[: self.num_images] for k, v in batch.items()}

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self._batch is None or not trainer.is_global_zero:
            return
        dm, model = trainer.datamodule, pl_module.model
        if not hasattr(model, "reconstruct") or not hasattr(dm, "denormalize"):
            return
        from torchvision.utils import make_grid, save_image

        recon = model.reconstruct(self._batch).float()
        x = dm.denormalize(self._batch["x"].float())
        recon = dm.denormalize(recon)
        n = x.shape[0]
        per_row = min(8, n)
        rows = []
        for i in range(0, n, per_row):
            rows += [x[i : i + per_row], recon[i : i + per_row]]
        grid = make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=1.0)
        out = Path(trainer.default_root_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        save_image(grid, out / "images" / f"recon_epoch{trainer.current_epoch:03d}.png")
        save_image(grid, out / "reconstructions.png")
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):  # TensorBoard
                exp.add_image("reconstructions", grid, trainer.global_step)
            elif type(logger).__name__ == "WandbLogger":
                logger.log_image("reconstructions", [grid], step=trainer.global_step)
        self._batch = None


class LossCurvePlot(pl.Callback):
    """Writes the history as `loss_history.json` in the run dir at every epoch end (cheap), and draws it as
    `loss_curve.png` (train loss per logged step, train/val loss per epoch) every `every_n_epochs` epochs and
    when training ends. Drawing costs ~0.1-0.2 s (matplotlib): nothing next to an image model's epoch, but
    a third of an SCGC epoch (0.4 s), so short-epoch recipes draw every N epochs (conf/callbacks/clustering.yaml)."""

    def __init__(self, every_n_epochs: int = 1):
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.loss_curve.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self._pending_step: int | None = None
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "train/loss_epoch": [], "val/loss": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # already counts this batch's optimizer step
        if (step - 1) % trainer.log_every_n_steps:
            return  # the module logs train/loss only every log_every_n_steps; reading metrics is not free
        v = trainer.callback_metrics.get("train/loss")
        if v is not None:
            self.history["train/loss"].append((step, float(v)))

    def on_validation_epoch_end(self, trainer, pl_module):
        v = trainer.callback_metrics.get("val/loss")
        if v is not None and not trainer.sanity_checking:
            self.history["val/loss"].append((trainer.global_step, float(v)))

    # Lightning runs callbacks' epoch-end hooks before the module's, so the epoch mean the module logs is
    # only readable from the next epoch start (or the end of training).
    def on_train_epoch_end(self, trainer, pl_module):
        self._pending_step = trainer.global_step
        if trainer.is_global_zero:
            max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
            last = 0 < max_epochs <= trainer.current_epoch + 1 or (
                0 <= trainer.max_steps <= trainer.global_step)  # on_train_end draws the final curve
            draw = (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not last
            self.plot(Path(trainer.default_root_dir), draw=draw)

    def _collect_epoch_mean(self, trainer):
        v = trainer.callback_metrics.get("train/loss_epoch")
        if self._pending_step is not None and v is not None:
            self.history["train/loss_epoch"].append((self._pending_step, float(v)))
        self._pending_step = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._collect_epoch_mean(trainer)

    def on_train_end(self, trainer, pl_module):
        self._collect_epoch_mean(trainer)
        if trainer.is_global_zero:
            self.plot(Path(trainer.default_root_dir))

    def plot(self, out: Path, draw: bool = True) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "loss_history.json").write_text(json.dumps(self.history))
        if not draw:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        styles = {"train/loss": dict(alpha=0.4, lw=1), "train/loss_epoch": dict(marker="o"),
                  "val/loss": dict(marker="s")}
        for name, points in self.history.items():
            if points:
                steps, vals = zip(*points)
                ax.plot(steps, vals, label=name, **styles[name])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        if all(v > 0 for pts in self.history.values() for _, v in pts) and any(self.history.values()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png")
        plt.close(fig)

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = {k: [tuple(p) for p in v] for k, v in state["history"].items()}
