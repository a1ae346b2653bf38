"""The ε-prediction UNet of (latent) DDPMs in 1-, 2- or 3-D, in the layout of DDPM / "guided diffusion" (and of
LDAE's latent DDPM, card 7): a time embedding, input blocks (residual blocks, self-attention at the chosen
downsample factors, strided-conv downsampling), a middle block (res, attention, res) and output blocks that
consume the input blocks' skips in reverse. Residual blocks take the embedding as a group-norm scale and shift.

The network is split in two halves so that PDAE/LDAE's shift branch can reuse the frozen first half:
`encode_path(x, emb)` -> (h, skips) and `decode_path(h, skips, emb)`. `DiffusionUNet(decoder_only=True)`
builds only the second half (middle + output blocks + output conv), the trainable copy the shift branch is.
Not MONAI's DiffusionModelUNet: that one has no dropout (the card's UNet uses 0.1) and needs einops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.nn.diffusion import timestep_embedding


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place: residual branches and output convs start as the identity / 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN scaled and shifted by the embedding, SiLU, dropout, zero-initialised conv; + skip."""

    def __init__(self, dims: int, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), conv_nd(dims, c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))
        self.out_norm = nn.GroupNorm(groups, c_out)
        out_conv = zero_(conv_nd(dims, c_out, c_out, 3, padding=1))
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), out_conv)
        self.skip = nn.Identity() if c_in == c_out else conv_nd(dims, c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb).view(emb.shape[0], -1, *([1] * (x.ndim - 2))).chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all positions, residual, zero-initialised projection."""

    def __init__(self, dims: int, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels are not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = conv_nd(1, channels, 3 * channels, 1)
        self.proj = zero_(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c = x.shape[:2]
        q, k, v = self.qkv(self.norm(x).reshape(b, c, -1)).reshape(b, 3 * self.heads, c // self.heads, -1).chunk(3, 1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, -1)).reshape(x.shape)


class Down(nn.Module):
    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x, emb=None, size=None):
        return self.conv(F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2))


class Sequence(nn.ModuleList):
    """Layers applied in turn; those of this file take the embedding too (a plain conv does not)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, Attention, Down, Up)) else layer(x)
        return x


class DiffusionUNet(nn.Module):
    """`forward(x, t) -> ε̂` with x (B, in_channels, *spatial) and t (B,) integer timesteps.

    channels of level i = base_channels · channel_mult[i]; `attention_factors`: the downsample factors (1, 2,
    4, …) whose levels get self-attention with `heads` heads (the middle block always has one)."""

    def __init__(
        self,
        dims: int = 3,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 256,
        channel_mult: list[int] = (1, 2, 3),
        num_res_blocks: int = 2,
        attention_factors: list[int] = (2, 4),
        heads: int = 1,
        dropout: float = 0.1,
        groups: int = 32,
        decoder_only: bool = False,
    ):
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"DiffusionUNet dims={dims}; valid: 1, 2, 3")
        widths = [base_channels * m for m in channel_mult]
        bad = [c for c in widths if c % groups]
        if bad:
            raise ValueError(f"DiffusionUNet widths {bad} are not divisible by groups={groups}")
        self.base_channels, self.emb_dim = base_channels, 4 * base_channels
        emb_dim = self.emb_dim
        res = lambda a, b: ResBlock(dims, a, b, emb_dim, dropout, groups)  # noqa: E731
        attn = lambda c: Attention(dims, c, heads, groups)  # noqa: E731
        # the skips' widths, as the input blocks produce them (the output blocks consume them in reverse)
        skips, ch, factor = [base_channels], base_channels, 1
        input_blocks = [Sequence([conv_nd(dims, in_channels, base_channels, 3, padding=1)])]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers = [res(ch, width)] + ([attn(width)] if factor in attention_factors else [])
                input_blocks.append(Sequence(layers))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                input_blocks.append(Sequence([Down(dims, ch)]))
                skips.append(ch)
                factor *= 2
        if not decoder_only:
            self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.input_blocks = nn.ModuleList(input_blocks)
        self.middle_block = Sequence([res(ch, ch), attn(ch), res(ch, ch)])
        output_blocks = []
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), width)] + ([attn(width)] if factor in attention_factors else [])
                ch = width
                if level > 0 and i == num_res_blocks:
                    layers.append(Up(dims, ch))
                    factor //= 2
                output_blocks.append(Sequence(layers))
        self.output_blocks = nn.ModuleList(output_blocks)
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), zero_(conv_nd(dims, ch, out_channels, 3,
                                                                                      padding=1)))

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.base_channels))

    def encode_path(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return h, skips

    def decode_path(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(h, emb)
        skips = list(skips)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                # upsample to the next skip's size: odd sizes (5 -> 3 -> 5) round-trip exactly
                h = layer(h, emb, size=skips[-1].shape[2:]) if isinstance(layer, Up) else Sequence([layer])(h, emb)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        h, skips = self.encode_path(x, emb)
        return self.decode_path(h, skips, emb)
