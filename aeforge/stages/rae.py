"""RAE's latent statistics, once before training: the per-(token, channel) mean and variance of the frozen
encoder's tokens over `batches` un-augmented training batches (card 2: computed over the training set), kept
in the model's `LatentNorm` buffers and so in every checkpoint; a generator trained in the RAE latent reads them
from there. Skipped when the model already holds statistics (started from a checkpoint with `ckpt=`), and on
resume."""

from __future__ import annotations

import torch

from aeforge.stages import StageContext


class LatentStats:
    def __init__(self, batches: int = 200, batch_size: int = 256):
        if batches < 1 or batch_size < 1:
            raise ValueError(f"stages.rae_latent_stats: batches and batch_size must be >= 1, got {batches}, "
                             f"{batch_size}")
        self.batches, self.batch_size = batches, batch_size

    @torch.no_grad()
    def __call__(self, model, datamodule, ctx: StageContext) -> dict[str, float]:
        log = ctx.logger("rae_latent_stats")
        if not hasattr(model, "update_latent_stats"):
            raise ValueError(f"stages.rae_latent_stats needs a model with latent statistics (RAE), got "
                             f"{type(model).__name__}")
        if model.latent_norm.ready:
            log.info("the model already holds latent statistics (%d samples): kept", int(model.latent_norm.count))
            return {}
        if getattr(datamodule, "train_set", None) is None:
            datamodule.setup("fit")
        model.to(ctx.device)
        for i, batch in enumerate(datamodule.eval_dataloader("train", self.batch_size)):
            if i >= self.batches:
                break
            x = datamodule.normalize(batch["x"].to(ctx.device))
            model.update_latent_stats(x)
        model.finish_latent_stats()
        norm = model.latent_norm
        log.info("latent statistics over %d images: mean |m| %.3g, mean v %.3g", int(norm.count),
                 norm.mean.abs().mean().item(), norm.var.mean().item())
        return {"latent_stats/samples": float(norm.count), "latent_stats/mean_var": norm.var.mean().item()}
