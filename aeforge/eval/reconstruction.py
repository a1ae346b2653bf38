"""Reconstruction quality on the val split: MSE in the model's (normalised) space, PSNR and SSIM on
[0, 1] images (torchmetrics)."""

from __future__ import annotations

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from aeforge.eval.skips import skipped


class ReconstructionMetrics:
    def __call__(self, ctx) -> dict[str, float]:
        if not hasattr(ctx.model, "reconstruct"):
            return skipped(type(self).__name__, f"{type(ctx.model).__name__} has no reconstruct(); no psnr/ssim")
        psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(ctx.device)
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(ctx.device)
        se, n = 0.0, 0
        with torch.no_grad():
            for batch in ctx.batches("val", "reconstructions"):
                recon = ctx.model.reconstruct(batch).float()
                se += (recon - batch["x"]).pow(2).sum().item()
                n += batch["x"].numel()
                a, b = ctx.datamodule.denormalize(recon), ctx.datamodule.denormalize(batch["x"])
                if a.shape[-1] < 11:  # SSIM's 11x11 window needs at least 11 pixels a side
                    a, b = (torch.nn.functional.interpolate(t, size=11, mode="nearest") for t in (a, b))
                psnr.update(a, b)
                ssim.update(a, b)
        return {"mse": se / max(n, 1), "psnr": psnr.compute().item(), "ssim": ssim.compute().item()}
