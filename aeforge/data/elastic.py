"""Elastic deformation (Simard, Steinkraus, Platt 2003) of every training batch, on the device: the online
augmentation of the prototype network's MNIST recipe (Li et al. 2018). A random displacement field per image,
U(-1, 1) per pixel, smoothed with a Gaussian of std `elastic_sigma` (zero outside the image, truncated at 4 sigma
as scipy's gaussian_filter), scaled by `elastic_alpha` pixels; the image is resampled bilinearly there (zeros
outside). Evaluation batches are never deformed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aeforge.data.images import ArrayImageDataModule


def gaussian_kernel(sigma: float, device=None) -> torch.Tensor:
    radius = max(int(4.0 * sigma + 0.5), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def elastic_deform(x: torch.Tensor, sigma: float, alpha: float, generator: torch.Generator | None = None):
    """x: (B, C, H, W) float; returns x warped by a smoothed random displacement field (pixels: alpha x field)."""
    b, _, h, w = x.shape
    field = torch.rand(b * 2, 1, h, w, generator=generator, device=x.device, dtype=torch.float32) * 2 - 1
    k = gaussian_kernel(sigma, x.device)
    r = (len(k) - 1) // 2
    field = F.conv2d(field, k.view(1, 1, 1, -1), padding=(0, r))  # separable smoothing, zero padding
    field = F.conv2d(field, k.view(1, 1, -1, 1), padding=(r, 0))
    dx, dy = (alpha * field).view(b, 2, h, w).unbind(1)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gx = (xs + dx) * (2 / max(w - 1, 1)) - 1  # pixel -> [-1, 1] (align_corners=True)
    gy = (ys + dy) * (2 / max(h - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class ElasticArrayImageDataModule(ArrayImageDataModule):
    """ArrayImageDataModule whose training batches are elastically deformed (before normalisation) on the device.
    elastic_alpha=0 turns the deformation off."""

    def __init__(self, elastic_sigma: float = 4.0, elastic_alpha: float = 20.0, **kwargs):
        super().__init__(**kwargs)
        if not (elastic_sigma > 0 and math.isfinite(elastic_sigma)):
            raise ValueError(f"data.elastic_sigma must be > 0, got {elastic_sigma}")
        self.elastic_sigma, self.elastic_alpha = elastic_sigma, elastic_alpha

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        if augment and self.elastic_alpha > 0:
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            x = elastic_deform(x, self.elastic_sigma, self.elastic_alpha)
        return super().normalize(x, augment=augment)
