"""StRegA's compact context-encoding VAE (ceVAE; Zimmerer et al. 2018, Chatterjee et al. 2022): card 11.

One convolutional VAE serves two branches that share encoder and decoder:
- the VAE branch reconstructs the input from a reparameterised sample of q(z|x);
- the context-encoding branch feeds the same network an input with 0..`ce_max_squares` random squares
  overwritten by a random value in [min(x), max(x)] of that image, and is trained to give back the clean
  image (objective: aeforge/objectives/cevae.py), i.e. to in-paint the squares from their context.

Anomaly map per pixel (`anomaly_map`): the reconstruction difference of the VAE branch (`diff` picks the sign
the card's pipeline keeps, x̂ − x, or its opposite, or |x̂ − x|), optionally times the magnitude of the gradient
of the VAE loss with respect to the input (`score: combi`, ceVAE's combined score), zeroed outside the
foreground. `segment` is the card's post-processing: values above `clip_threshold` set to 1, an Otsu threshold,
morphological area opening (`opening_area` pixels), zero outside the foreground. Per image
(`anomaly_score`): the mean of the map.

`context_encoding: false` is the plain conv VAE (the card's ce_factor = 0 ablation, the baseline).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from aeforge.models.base import AutoencoderModel

DIFFS = ("recon_minus_input", "input_minus_recon", "abs")
SCORES = ("rec", "combi")


def context_corrupt(
    x: torch.Tensor, max_squares: int, max_size: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted x, mask (B, 1, H, W) bool): per image 0..max_squares squares of side U[0, max_size·min(H, W)]
    at uniform positions, each filled with one value drawn in [min, max] of that image. Pixels outside the
    mask are returned bit-identical."""
    b, _, h, w = x.shape
    dev = x.device
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)  # noqa: E731
    k = max_squares
    count = torch.randint(0, k + 1, (b, 1), generator=generator, device=dev)
    side = (rand(b, k) * max_size * min(h, w)).floor()
    y0 = (rand(b, k) * (h - side + 1)).floor()
    x0 = (rand(b, k) * (w - side + 1)).floor()
    lo, hi = x.flatten(1).amin(1), x.flatten(1).amax(1)
    fill = lo[:, None] + rand(b, k) * (hi - lo)[:, None]
    rows = torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    on = (torch.arange(k, device=dev)[None] < count)[..., None, None]
    squares = (on & (rows >= y0[..., None, None]) & (rows < (y0 + side)[..., None, None])
               & (cols >= x0[..., None, None]) & (cols < (x0 + side)[..., None, None]))  # (B, K, H, W)
    out = x
    for j in range(k):  # a later square paints over an earlier one
        out = torch.where(squares[:, j : j + 1], fill[:, j, None, None, None].to(x.dtype), out)
    return out, squares.any(1, keepdim=True)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance over a `bins`-bin histogram) of a 1-D array."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between[:-1]))]) if bins > 1 else lo


def area_opening(mask: np.ndarray, area: int) -> np.ndarray:
    """Binary area opening: drop 4-connected components smaller than `area` pixels."""
    if area <= 1:
        return mask
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= area
    keep[0] = False
    return keep[labels]


class ContextEncodingVAE(AutoencoderModel):
    """Compact ceVAE: conv k3 s2 + PReLU encoder through `channels`, a conv to a 1×1 map of 2·z_dim channels
    (mean, log-std), a transposed conv back to the last feature map, ConvT k4 s2 + PReLU decoder. Inputs whose
    side is not a multiple of 2^len(channels) are zero-padded (and the output cropped)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        channels: list[int],
        z_dim: int,
        context_encoding: bool = True,
        ce_max_squares: int = 3,
        ce_max_size: float = 0.5,
        diff: str = "abs",
        score: str = "rec",
        clip_threshold: float = 0.2,
        opening_area: int = 256,
        logstd_clamp: float = 10.0,
    ):
        super().__init__()
        if diff not in DIFFS:
            raise ValueError(f"model.diff={diff!r}; choose one of {list(DIFFS)}")
        if score not in SCORES:
            raise ValueError(f"model.score={score!r}; choose one of {list(SCORES)}")
        if not 0 < ce_max_size <= 1:
            raise ValueError(f"model.ce_max_size={ce_max_size} must be in (0, 1] (a fraction of the image side)")
        if ce_max_squares < 1:
            raise ValueError(f"model.ce_max_squares={ce_max_squares} must be >= 1")
        c, h, w = input_shape
        self.input_shape, self.z_dim = tuple(input_shape), z_dim
        self.context_encoding, self.ce_max_squares, self.ce_max_size = context_encoding, ce_max_squares, ce_max_size
        self.diff, self.score, self.clip_threshold, self.opening_area = diff, score, clip_threshold, opening_area
        self.logstd_clamp = logstd_clamp
        step = 2 ** len(channels)
        self.padded = (math.ceil(h / step) * step, math.ceil(w / step) * step)
        fh, fw = self.padded[0] // step, self.padded[1] // step
        enc: list[nn.Module] = []
        for ch in channels:
            enc += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.PReLU(ch)]
            c = ch
        self.encoder = nn.Sequential(*enc, nn.Conv2d(c, 2 * z_dim, (fh, fw)))  # to a 1x1 map
        dec: list[nn.Module] = [nn.ConvTranspose2d(z_dim, channels[-1], (fh, fw)), nn.PReLU(channels[-1])]
        rev = list(reversed(channels))
        for i, ch in enumerate(rev):
            nxt = rev[i + 1] if i + 1 < len(rev) else input_shape[0]
            dec.append(nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1))
            if i + 1 < len(rev):
                dec.append(nn.PReLU(nxt))
        self.decoder = nn.Sequential(*dec)

    # -- the VAE ----------------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x); the network outputs log-std, as the card's code does."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.padded[1] - w, 0, self.padded[0] - h))
        mu, logstd = self.encoder(x).flatten(1).chunk(2, dim=1)
        return mu, 2 * logstd.clamp(-self.logstd_clamp, self.logstd_clamp)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self.input_shape[1:]
        return self.decoder(z[..., None, None])[..., :h, :w]

    def _vae(self, x: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return {"mu": mu, "logvar": logvar, "z": z, "recon": self.decode(z)}

    def encode(self, batch):
        return self.posterior(batch["x"])[0]

    def forward(self, batch):
        x = batch["x"]
        out = self._vae(x, sample=self.training)
        if self.context_encoding:
            corrupted, mask = context_corrupt(x, self.ce_max_squares, self.ce_max_size)
            out.update(recon_ce=self._vae(corrupted, sample=self.training)["recon"], ce_mask=mask,
                       x_ce=corrupted)
        return out

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.decode(torch.randn(n, self.z_dim, device=next(self.parameters()).device))

    # -- anomaly scoring (decoupled from the training loss) ------------------------------------------------
    def _difference(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        d = recon - x
        d = {"recon_minus_input": d.clamp(min=0), "input_minus_recon": (-d).clamp(min=0), "abs": d.abs()}[self.diff]
        return d.mean(1, keepdim=True)  # over channels

    def anomaly_map(self, batch: dict) -> torch.Tensor:
        """(B, 1, H, W) per-pixel anomaly score, higher = more anomalous; 0 outside batch['foreground']."""
        x = batch["x"].float()
        if self.score == "combi":
            # ceVAE's combination: reconstruction difference × |∂ VAE loss / ∂x| (mean-posterior pass)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                out = self._vae(xg, sample=False)
                mu, logvar = out["mu"], out["logvar"]
                kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean(1)
                loss = ((out["recon"] - xg).abs().flatten(1).mean(1) + kl).sum()
                (grad,) = torch.autograd.grad(loss, xg)
            amap = self._difference(x, out["recon"].detach()) * grad.abs().mean(1, keepdim=True)
        else:
            with torch.no_grad():
                amap = self._difference(x, self._vae(x, sample=False)["recon"])
        if "foreground" in batch:
            amap = amap * batch["foreground"].to(amap.dtype)
        return amap.detach()

    @torch.no_grad()
    def anomaly_score(self, batch: dict) -> torch.Tensor:
        return self.anomaly_map(batch).flatten(1).mean(1)

    @torch.no_grad()
    def segment(self, batch: dict) -> torch.Tensor:
        """The card's post-processing of each image's map: clip at `clip_threshold` to 1, Otsu, area opening,
        zero outside the foreground. (B, 1, H, W) bool."""
        maps = self.anomaly_map(batch).cpu().numpy()
        fg = batch["foreground"].cpu().numpy().astype(bool) if "foreground" in batch else np.ones_like(maps, bool)
        out = np.zeros(maps.shape, dtype=bool)
        for i, (m, f) in enumerate(zip(maps, fg)):
            m = np.where(m > self.clip_threshold, 1.0, m)
            inside = m[f]
            if inside.size == 0:
                continue
            binary = (m > otsu_threshold(inside)) & f
            out[i, 0] = area_opening(binary[0], self.opening_area)
        return torch.from_numpy(out)
