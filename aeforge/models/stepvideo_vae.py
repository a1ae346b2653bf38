"""Step-Video-T2V's Video-VAE (card 5): a causal 3-D conv VAE with 16x16 spatial x 8 temporal compression and
64 latent channels, whose encoder end and decoder start are *dual-path*: a learned conv path plus a
parameter-free shortcut (3-D pixel-unshuffle + channel averaging down, channel duplication + pixel-shuffle up).

Layout (defaults = the card's full size):
  encoder  enc_backbone: CausalConv3d(3 -> ch) -> levels (ch*enc_mult, enc_blocks causal ResBlock3d each, a
           stride-2 causal conv after every level but the last: spatial only or 3-D per `temporal_down`)
           enc_mid: Res -> spatial attention -> Res
           enc_dual: GroupNorm-SiLU -> DualPathDown(x2x2x2 -> patch_channels) -> DualPathDown(-> 2z)
  decoder  dec_dual: DualPathUp(z -> patch_channels) -> DualPathUp(x2x2x2 -> dec top width)
           dec_mid: Res -> spatial attention -> Res
           dec_backbone: levels (dec_ch*dec_mult, dec_blocks each, nearest x2 upsampling + causal conv between
           levels, 3-D where the encoder went down in time) -> GroupNorm-SiLU-CausalConv3d(-> 3)
With `dual_path=false` the ends are a plain conv (the card's stage-1 4x8x8 VAE). Time: a clip of T = 1 + r*k
frames (r = the temporal factor) gives 1 + k latent frames, the first frame encoded alone (each temporal
down/up-sampling follows the "first frame alone" convention of aeforge/nn/video.py; an image is a 1-frame clip
and costs one frame). Every temporal op is causal, so a long clip
is encoded/decoded `chunk_frames` at a time (first chunk 1 + r*m frames, then r*m) with caches, equal to the
whole-clip pass and with memory bounded by the chunk (aeforge/nn/video.py).

Stage-wise unfreezing (card stage 2: dual path first, then mid blocks, then the ResNet backbone) is a
`freeze` list + `freeze_schedule` over the module names enc_backbone, enc_mid, enc_dual, dec_dual, dec_mid,
dec_backbone (aeforge/nn/freeze.py)."""

from __future__ import annotations

import torch
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn import freeze as freezing
from aeforge.nn.video import (
    CausalConv3d,
    DualPathDown,
    DualPathUp,
    FrameGroupNorm,
    ResBlock3d,
    SpatialAttention,
    Upsample3d,
    chunked,
)

STAGE_MODULES = ("enc_backbone", "enc_mid", "enc_dual", "dec_dual", "dec_mid", "dec_backbone")


def _mid(channels: int, heads: int) -> nn.Sequential:
    return nn.Sequential(ResBlock3d(channels, channels), SpatialAttention(channels, heads),
                         ResBlock3d(channels, channels))


class StepVideoVAE(AutoencoderModel):
    modality = "video"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_channels: int = 64,
        enc_channels: int = 32,
        enc_mult: list[int] = (4, 8, 16, 16),
        enc_blocks: int = 2,
        dec_channels: int = 128,
        dec_mult: list[int] = (1, 2, 4, 4),
        dec_blocks: int = 3,
        temporal_down: list[bool] = (False, True, True),
        dual_path: bool = True,
        patch_channels: int | None = None,
        attn_heads: int = 1,
        zero_conv_path: bool = False,
        sample_posterior: bool = True,
        chunk_frames: int = 17,
        freeze: list[str] = (),
        freeze_schedule: dict | None = None,
    ):
        super().__init__()
        c, t, h, w = input_shape
        levels = len(enc_mult)
        if len(dec_mult) != levels:
            raise ValueError(f"model.dec_mult has {len(dec_mult)} levels, model.enc_mult {levels}: they must match")
        if len(temporal_down) != levels - 1:
            raise ValueError(f"model.temporal_down needs one flag per level transition ({levels - 1}), "
                             f"got {list(temporal_down)}")
        self.dual_path = dual_path
        self.latent_channels = latent_channels
        self.sample_posterior = sample_posterior
        patch = 2 if dual_path else 1
        self.spatial_factor = 2 ** (levels - 1) * patch
        self.temporal_factor = 2 ** sum(bool(d) for d in temporal_down) * patch
        r = self.temporal_factor
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"data.image_size: {h}x{w} is not divisible by the spatial factor {self.spatial_factor}")
        if (t - 1) % r:
            raise ValueError(f"data.frames={t}: a clip must have 1 + {r}*k frames (temporal factor {r})")
        if chunk_frames < 1 or (chunk_frames - 1) % r:
            raise ValueError(f"model.chunk_frames={chunk_frames}: must be 1 + {r}*k (k >= 0) frames")
        self.chunk_frames = chunk_frames
        patch_channels = patch_channels or 32 * latent_channels

        # encoder
        widths = [enc_channels * m for m in enc_mult]
        blocks: list[nn.Module] = [CausalConv3d(c, enc_channels, 3)]
        prev = enc_channels
        for i, ch in enumerate(widths):
            for _ in range(enc_blocks):
                blocks.append(ResBlock3d(prev, ch))
                prev = ch
            if i < levels - 1:
                blocks.append(CausalConv3d(ch, ch, 3, stride=(2 if temporal_down[i] else 1, 2, 2)))
        self.enc_backbone = nn.Sequential(*blocks)
        self.enc_mid = _mid(prev, attn_heads)
        head: list[nn.Module] = [FrameGroupNorm(prev), nn.SiLU()]
        if dual_path:
            head += [DualPathDown(prev, patch_channels, (2, 2, 2)), DualPathDown(patch_channels, 2 * latent_channels,
                                                                               (1, 1, 1))]
        else:
            head.append(CausalConv3d(prev, 2 * latent_channels, 3))
        self.enc_dual = nn.Sequential(*head)

        # decoder
        dwidths = [dec_channels * m for m in dec_mult]
        top = dwidths[-1]
        self.dec_dual = (nn.Sequential(DualPathUp(latent_channels, patch_channels, (1, 1, 1)),
                                       DualPathUp(patch_channels, top, (2, 2, 2)))
                         if dual_path else CausalConv3d(latent_channels, top, 3))
        self.dec_mid = _mid(top, attn_heads)
        blocks, prev = [], top
        for i in reversed(range(levels)):
            for _ in range(dec_blocks):
                blocks.append(ResBlock3d(prev, dwidths[i]))
                prev = dwidths[i]
            if i > 0:
                blocks.append(Upsample3d(prev, bool(temporal_down[i - 1])))
        blocks += [FrameGroupNorm(prev), nn.SiLU(), CausalConv3d(prev, c, 3)]
        self.dec_backbone = nn.Sequential(*blocks)
        if zero_conv_path:
            for m in self.conv_paths():
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.conv.bias)

        self.schedule = freezing.FreezeSchedule(freeze, freeze_schedule)
        self.schedule.check(self, "model.freeze / model.freeze_schedule")
        freezing.freeze(self, self.schedule.initial_frozen())

    # -- structure -------------------------------------------------------------------------------------
    def conv_paths(self) -> list[CausalConv3d]:
        """The learned convs of the dual-path ends (zeroing them leaves the shortcut path alone)."""
        if not self.dual_path:
            return []
        return [m.conv for m in self.modules() if isinstance(m, DualPathDown | DualPathUp)]

    def last_layer_weight(self) -> torch.Tensor:
        return self.dec_backbone[-1].weight

    # -- encode / decode ---------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_dual(self.enc_mid(self.enc_backbone(x)))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec_backbone(self.dec_mid(self.dec_dual(z)))

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, 1 + r*k, H, W) -> posterior mean and log-variance (B, z, 1 + k, H/s, W/s), chunk by chunk."""
        t, r = x.shape[2], self.temporal_factor
        if (t - 1) % r:
            raise ValueError(f"a clip of {t} frames: the model needs 1 + {r}*k frames")
        if t <= self.chunk_frames:
            h = self._encode(x)
        else:
            h = chunked(self._encode, self, x, self.chunk_frames, self.chunk_frames - 1)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z, 1 + k, h, w) -> (B, 3, 1 + r*k, H, W), chunk by chunk with caches."""
        per = (self.chunk_frames - 1) // self.temporal_factor
        if per == 0 or z.shape[2] <= 1 + per:
            return self._decode(z)
        return chunked(self._decode, self, z, 1 + per, per)

    # -- the model contract ------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        progress = batch.get("progress")
        if self.training and progress is not None:
            self.schedule.apply(self, progress.step)  # a resumed run starts in its stage
        mean, logvar = self.moments(batch["x"])
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training and self.sample_posterior else mean
        return {"recon": self.decode(z), "mu": mean, "logvar": logvar, "z": z}

    def on_train_step_end(self, step: int, total: int) -> None:
        self.schedule.apply(self, step)

    def latents(self, batch: dict) -> dict[str, torch.Tensor]:
        """Everything the decoder needs: the posterior mean."""
        return {"z": self.moments(batch["x"])[0]}

    def decode_latents(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode(latents["z"])

    def reconstruct(self, batch: dict) -> torch.Tensor:
        return self.decode(self.moments(batch["x"])[0])

    def encode(self, batch: dict) -> torch.Tensor:
        """(B, z): the posterior mean averaged over latent time and space (for probes)."""
        return self.moments(batch["x"])[0].mean(dim=(2, 3, 4))
