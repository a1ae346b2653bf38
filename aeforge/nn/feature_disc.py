"""A projected-GAN discriminator over a frozen ViT's features, the one RAE trains its decoder against (card 2;
the StyleGAN-T recipe): images are DiffAugment-ed (colour + translation, probability 1, no cutout), clamped to
[-1, 1] and quantised to 8 bits (straight-through, so the generator still gets a gradient), then read by a FROZEN
ViT (`backbone`, any FrozenEncoder source; RAE: DINO ViT-S/8). The tokens of several blocks each go through a
trainable head — spectral-normalised 1-D convolutions over the token sequence (kernel 1, then a residual kernel-9
block) with BatchNorm and LeakyReLU — giving one logit per token; the logits of all heads are concatenated (B, L).
The GAN term that uses it is objectives/adversarial.py (module=gan)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from aeforge.targets.encoders import FrozenEncoder


def diff_augment(x: torch.Tensor, translation: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) 'color,translation' on images in [-1, 1]: random brightness (±0.5 in
    [0, 1] units), saturation (x[0, 2]) and contrast (x[0.5, 1.5]) per sample, then a random integer shift of
    up to `translation` of the size with zero padding. Differentiable in x."""
    b = x.shape[0]
    r = lambda: torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype, generator=generator)
    x = x + (r() - 0.5) * 2  # brightness: ±0.5 of the [0, 1] range is ±1 in [-1, 1]
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (r() + 0.5) + mean
    if translation > 0:
        h, w = x.shape[-2:]
        sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = torch.randint(-sh, sh + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(-sw, sw + 1, (b,), device=x.device, generator=generator)
        ys = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # source row of each target row
        xs = torch.arange(w, device=x.device)[None, :] - dx[:, None]
        valid = ((ys >= 0) & (ys < h))[:, None, :, None] & ((xs >= 0) & (xs < w))[:, None, None, :]
        idx_y = ys.clamp(0, h - 1)[:, None, :, None].expand(-1, x.shape[1], -1, w)
        x = torch.gather(x, 2, idx_y)
        idx_x = xs.clamp(0, w - 1)[:, None, None, :].expand(-1, x.shape[1], h, -1)
        x = torch.gather(x, 3, idx_x) * valid
    return x


class DiscHead(nn.Module):
    def __init__(self, dim: int, channels: int, kernel: int):
        super().__init__()
        conv = lambda cin, cout, k: spectral_norm(nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular"))
        self.inp = nn.Sequential(conv(dim, channels, 1), nn.BatchNorm1d(channels), nn.LeakyReLU(0.2))
        self.res = nn.Sequential(conv(channels, channels, kernel), nn.BatchNorm1d(channels), nn.LeakyReLU(0.2))
        self.out = conv(channels, 1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.inp(tokens.transpose(1, 2))
        h = (h + self.res(h)) / 2**0.5
        return self.out(h).flatten(1)


class DINODiscriminator(nn.Module):
    def __init__(
        self,
        backbone: str = "hf:facebook/dino-vits8",
        layers: list[int] | None = None,
        input_size: int | None = 224,
        channels: int = 64,
        kernel: int = 9,
        diffaug: bool = True,
        translation: float = 0.125,
        quantize: bool = True,
        missing_weights: str = "error",
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        # no final-norm stripping or prefix handling matters here: intermediate blocks, prefix tokens dropped
        self.backbone = FrozenEncoder(backbone, strip_final_norm_affine=False, input_size=input_size,
                                      missing_weights=missing_weights, model_kwargs=backbone_kwargs)
        depth = self._depth()
        self.layers = list(layers) if layers is not None else sorted({depth // 4 - 1, depth // 2 - 1,
                                                                      3 * depth // 4 - 1, depth - 1})
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"discriminator layers {bad} out of range: the backbone has {depth} blocks "
                             f"(0..{depth - 1})")
        self.heads = nn.ModuleList(DiscHead(self.backbone.dim, channels, kernel) for _ in self.layers)
        self.diffaug, self.translation, self.quantize = diffaug, translation, quantize

    def _depth(self) -> int:
        net = self.backbone.net
        for owner in (net, getattr(net, "encoder", None)):
            for name in ("blocks", "layer", "layers"):
                if owner is not None and isinstance(getattr(owner, name, None), (nn.ModuleList, nn.Sequential)):
                    return len(getattr(owner, name))
        raise ValueError(f"discriminator backbone {self.backbone.source}: cannot find its transformer blocks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(-1, 1)
        if self.quantize:  # 8-bit like a saved image; straight-through so the generator keeps its gradient
            x = x + ((x + 1) * 127.5).round().div(127.5).sub(1).sub(x).detach()
        if self.diffaug:
            x = diff_augment(x, self.translation)
        feats = self.backbone.hidden_states(x, self.layers)
        return torch.cat([head(f.float()) for head, f in zip(self.heads, feats)], dim=1)
