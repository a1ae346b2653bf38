# long because the (2+1)-D blocks, the two encoders/decoders and the 2-D -> 3-D inflation share one layout
"""VideoVAE+ (card 3; Xing et al. 2024, "Large Motion Video Autoencoding with Cross-modal Video VAE").

Two stacked autoencoders, 4x8x8 (t x h x w) in all:
1. a **temporal-aware spatial AE**: an SD-style 2-D VAE whose residual blocks gain a temporal conv branch
   ((2+1)-D), whose mid block adds temporal attention (relative positions) next to its spatial attention
   (joint over all frames of a clip, "3-D"), and which cross-attends to caption tokens. It compresses 8x in
   space and not at all in time; its output is the first diagonal Gaussian q_s(z_s | x).
2. a **temporal compressor** of 1-D temporal convolutions on the sampled z_s: log2(4) stride-2 stages, each
   with a residual block and text cross-attention, to a second diagonal Gaussian q_t(z | z_s) with the same
   channel count. The KL of the objective is taken on this last posterior only (card).
Decode: temporal decoder -> spatial decoder. Images (`batch["is_image"]`, or 1-frame inputs) skip every
temporal layer and the compressor: their latent is z_s and their KL is on q_s (joint image-video training).

Layout: the spatial path uses the module names of diffusers' `AutoencoderKL` (encoder.down_blocks.i.resnets.j.
conv1, mid_block.attentions.0.to_q, quant_conv, ...), and every temporal / text layer starts as the identity
(its last projection is zero). So `inflate_from_2d` copies a 2-D image VAE's weights into the spatial path and
the inflated video model reproduces the 2-D model on an image or a static clip (tests/test_videovae_plus.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel, model_state_dict
from aeforge.nn.video import FrameGroupNorm, ResBlock2p1d, TemporalAttention

MID_ATTENTION = ("3d", "2d")


def zero(module: nn.Module) -> nn.Module:
    """Zero the last projection of a branch added to a 2-D network: it starts as the identity."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def spatial_conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv3d:
    """A 2-D conv applied to every frame, stored as a (1, k, k) Conv3d (the inflated 2-D kernel)."""
    pad = k // 2 if stride == 1 else 0
    return nn.Conv3d(cin, cout, (1, k, k), stride=(1, stride, stride), padding=(0, pad, pad))


class Cond:
    """What blocks need besides their input: whether the temporal layers are masked (an image batch), and the
    caption tokens (B, L, D) with their mask (or None)."""

    def __init__(self, mask_temporal: bool, ctx: torch.Tensor | None, ctx_mask: torch.Tensor | None):
        self.mask_temporal, self.ctx, self.ctx_mask = mask_temporal, ctx, ctx_mask


def attend(q, k, v, heads: int, mask=None):
    """Multi-head SDPA on (N, L, C) tokens."""
    split = lambda a: a.unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class SpatialAttention(nn.Module):
    """diffusers' single-head VAE attention (its module names, so 2-D weights load). mode "3d": over all T*H*W
    tokens of a clip (on a static clip exactly the per-frame result); "2d": per frame. Images: per frame."""

    def __init__(self, ch: int, mode: str):
        super().__init__()
        self.group_norm = FrameGroupNorm(ch)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])
        self.mode = mode

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, c, t, h, w = x.shape
        per_frame = self.mode == "2d" or cond.mask_temporal
        tok = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(b * t if per_frame else b, -1, c)
        out = self.to_out[0](attend(self.to_q(tok), self.to_k(tok), self.to_v(tok), 1))
        return x + out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class CrossAttention(nn.Module):
    """Latent tokens attend to the caption tokens (padding masked), per frame (`per_frame`) or over the whole
    clip (temporal model); zero-initialised output. With text off (no caption tokens) the identity."""

    def __init__(self, ch: int, ctx_dim: int, head_dim: int, per_frame: bool = True):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = FrameGroupNorm(ch)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ctx_dim, ch), nn.Linear(ctx_dim, ch)
        self.proj = zero(nn.Linear(ch, ch))
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        if cond.ctx is None:
            return x
        b, c, t, h, w = x.shape
        rep = t if self.per_frame else 1
        tok = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * rep, -1, c)
        ctx = cond.ctx.repeat_interleave(rep, 0)
        mask = cond.ctx_mask.repeat_interleave(rep, 0)[:, None, None, :]
        out = self.proj(attend(self.to_q(tok), self.to_k(ctx), self.to_v(ctx), self.heads, mask))
        return x + out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Resnet(ResBlock2p1d):
    """The shared non-causal (2+1)-D block (aeforge/nn/video.py), called with the batch's temporal mask."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, temporal=True, causal=False)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return super().forward(x, mask_temporal=cond.mask_temporal)


class MidBlock(nn.Module):
    def __init__(self, ch: int, mode: str, ctx_dim: int | None, head_dim: int, max_len: int):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(ch, ch), Resnet(ch, ch)])
        self.attentions = nn.ModuleList([SpatialAttention(ch, mode)])
        heads = max(1, ch // head_dim)
        self.temporal_attentions = nn.ModuleList([TemporalAttention(ch, heads, causal=False, max_len=max_len)])
        self.cross_attentions = nn.ModuleList([CrossAttention(ch, ctx_dim, head_dim)] if ctx_dim else [])

    def forward(self, x, cond):
        x = self.attentions[0](self.resnets[0](x, cond), cond)
        x = self.temporal_attentions[0](x, mask_temporal=cond.mask_temporal)
        for xa in self.cross_attentions:
            x = xa(x, cond)
        return self.resnets[1](x, cond)


class Level(nn.Module):
    """One resolution: residual blocks (each followed by text cross-attention at text levels), then a
    resampler (diffusers' asymmetric-pad stride-2 conv down; nearest x2 + conv up), per frame."""

    def __init__(self, cin, cout, n, resample: str | None, ctx_dim, head_dim):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(cin if i == 0 else cout, cout) for i in range(n)])
        self.cross_attentions = nn.ModuleList(
            [CrossAttention(cout, ctx_dim, head_dim) for _ in range(n)] if ctx_dim else [])
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.ModuleList([nn.Module()])
            self.downsamplers[0].conv = spatial_conv(cout, cout, 3, stride=2)
        elif resample == "up":
            self.upsamplers = nn.ModuleList([nn.Module()])
            self.upsamplers[0].conv = spatial_conv(cout, cout)

    def forward(self, x, cond):
        for i, block in enumerate(self.resnets):
            x = block(x, cond)
            if self.cross_attentions:
                x = self.cross_attentions[i](x, cond)
        if self.resample == "down":
            x = self.downsamplers[0].conv(F.pad(x, (0, 1, 0, 1)))
        elif self.resample == "up":
            x = self.upsamplers[0].conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
        return x


class SpatialEncoder(nn.Module):
    def __init__(self, cin, chans, n, z, mode, text_levels, ctx_dim, head_dim, max_len):
        super().__init__()
        self.conv_in = spatial_conv(cin, chans[0])
        self.down_blocks = nn.ModuleList([
            Level(chans[max(i - 1, 0)], c, n, "down" if i < len(chans) - 1 else None,
                  ctx_dim if i in text_levels else None, head_dim)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock(chans[-1], mode, ctx_dim, head_dim, max_len)
        self.conv_norm_out = FrameGroupNorm(chans[-1])
        self.conv_out = spatial_conv(chans[-1], 2 * z)

    def forward(self, x, cond):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x, cond)
        x = self.mid_block(x, cond)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class SpatialDecoder(nn.Module):
    def __init__(self, cout, chans, n, z, mode, text_levels, ctx_dim, head_dim, max_len):
        super().__init__()
        rev = list(reversed(chans))
        self.conv_in = spatial_conv(z, rev[0])
        self.mid_block = MidBlock(rev[0], mode, ctx_dim, head_dim, max_len)
        self.up_blocks = nn.ModuleList([
            Level(rev[max(i - 1, 0)], c, n + 1, "up" if i < len(rev) - 1 else None,
                  ctx_dim if len(chans) - 1 - i in text_levels else None, head_dim)
            for i, c in enumerate(rev)])
        self.conv_norm_out = FrameGroupNorm(chans[0])
        self.conv_out = spatial_conv(chans[0], cout)

    def forward(self, x, cond):
        x = self.mid_block(self.conv_in(x), cond)
        for level in self.up_blocks:
            x = level(x, cond)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class TimeResBlock(nn.Module):
    """Residual block of the temporal compressor: GN-SiLU-Conv(3, k, k) twice, on (B, C, T, h, w)."""

    def __init__(self, ch: int, k: int):
        super().__init__()
        self.norm1, self.conv1 = FrameGroupNorm(ch), tconv(ch, ch, k)
        self.norm2, self.conv2 = FrameGroupNorm(ch), tconv(ch, ch, k)

    def forward(self, x):
        d = self.conv1(tpad(F.silu(self.norm1(x))))
        return x + self.conv2(tpad(F.silu(self.norm2(d))))


def tpad(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, 0, 1, 1), mode="replicate")  # non-causal, as the reference's temporal model


def tconv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, (3, k, k), stride=(stride, 1, 1), padding=(0, k // 2, k // 2))


class TemporalCompressor(nn.Module):
    """Encoder: conv_in, then per stage [stride-2 temporal conv, residual block, text cross-attention over the
    clip's latent tokens], then GN-SiLU-conv to 2*z (mean, log-variance). The decoder mirrors it with nearest
    x2 temporal upsampling. Widths `hidden` (card: 128 -> 256 -> 512); 2^(len(hidden)-1) x in time."""

    def __init__(self, z: int, hidden: list[int], k: int, ctx_dim: int | None, head_dim: int):
        super().__init__()
        n = len(hidden) - 1
        xattn = lambda c: CrossAttention(c, ctx_dim, head_dim, per_frame=False)
        self.enc_in = tconv(z, hidden[0], k)
        self.enc_down = nn.ModuleList([tconv(hidden[i], hidden[i + 1], k, stride=2) for i in range(n)])
        self.enc_res = nn.ModuleList([TimeResBlock(hidden[i + 1], k) for i in range(n)])
        self.enc_xattn = nn.ModuleList([xattn(hidden[i + 1]) for i in range(n)] if ctx_dim else [])
        self.enc_norm, self.enc_out = FrameGroupNorm(hidden[-1]), tconv(hidden[-1], 2 * z, k)
        self.dec_in = tconv(z, hidden[-1], k)
        self.dec_res = nn.ModuleList([TimeResBlock(hidden[i + 1], k) for i in reversed(range(n))])
        self.dec_xattn = nn.ModuleList([xattn(hidden[i + 1]) for i in reversed(range(n))] if ctx_dim else [])
        self.dec_up = nn.ModuleList([tconv(hidden[i + 1], hidden[i], k) for i in reversed(range(n))])
        self.dec_norm, self.dec_out = FrameGroupNorm(hidden[0]), tconv(hidden[0], z, k)

    def encode(self, z, cond):
        x = self.enc_in(tpad(z))
        for i, (down, res) in enumerate(zip(self.enc_down, self.enc_res)):
            x = res(down(tpad(x)))
            if self.enc_xattn:
                x = self.enc_xattn[i](x, cond)
        return self.enc_out(tpad(F.silu(self.enc_norm(x))))

    def decode(self, z, cond):
        x = self.dec_in(tpad(z))
        for i, (res, up) in enumerate(zip(self.dec_res, self.dec_up)):
            x = res(x)
            if self.dec_xattn:
                x = self.dec_xattn[i](x, cond)
            x = up(tpad(F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode="nearest")))
        return self.dec_out(tpad(F.silu(self.dec_norm(x))))


def gaussian(stats: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu, logvar = stats.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as SD / the reference code
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
    return mu, logvar, z


class VideoVAEPlus(AutoencoderModel):
    """VideoVAE+ (see the module docstring). input_shape (C, T, H, W); T a multiple of the temporal factor
    (2^(len(temporal_channels)-1)) when the compressor is on, H and W multiples of 2^(len(channel_mult)-1).
    A batch is all videos or all images (`is_image`), as the data's joint mode delivers and the reference
    trains; 1-frame inputs are images."""

    modality = "video"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: int = 128,
        channel_mult: list[int] | None = None,
        num_res_blocks: int = 2,
        z_channels: int = 4,
        mid_attention: str = "3d",
        head_dim: int = 64,
        max_frames: int = 64,
        temporal_compressor: bool = True,
        temporal_channels: list[int] | None = None,
        temporal_spatial_kernel: int = 1,
        text_encoder: str | None = None,
        text_max_length: int = 100,
        text_levels: list[int] | None = None,
        caption_key: str = "caption",
        sample_posterior: bool = True,
        init_2d: str | None = None,
        chunk_frames: int = 16,
        norm_groups: int = 32,
    ):
        super().__init__()
        mult = list(channel_mult or [1, 2, 4, 4])
        self.input_shape = tuple(input_shape)
        if len(self.input_shape) != 4:
            raise ValueError(f"VideoVAEPlus needs video input_shape (C, T, H, W), got {self.input_shape}")
        if mid_attention not in MID_ATTENTION:
            raise ValueError(f"model.mid_attention={mid_attention!r}; valid: {list(MID_ATTENTION)}")
        chans = [channels * m for m in mult]
        hidden = list(temporal_channels or [128, 256, 512])
        self.spatial_factor = 2 ** (len(chans) - 1)
        self.temporal_factor = 2 ** (len(hidden) - 1) if temporal_compressor else 1
        if temporal_compressor and len(hidden) < 2:
            raise ValueError("model.temporal_channels needs >= 2 widths (one stride-2 stage per extra width)")
        if temporal_spatial_kernel not in (1, 3):
            raise ValueError(f"model.temporal_spatial_kernel must be 1 or 3, got {temporal_spatial_kernel}")
        levels = [len(chans) - 1] if text_levels is None else list(text_levels)
        if any(not 0 <= i < len(chans) for i in levels):
            raise ValueError(f"model.text_levels={levels}: levels are 0..{len(chans) - 1} (one per channel_mult)")
        if chunk_frames % self.temporal_factor:
            raise ValueError(f"model.chunk_frames={chunk_frames} must be a multiple of the temporal factor "
                             f"{self.temporal_factor}")
        self.text = None
        if text_encoder:
            from aeforge.targets.text_encoder import FrozenTextEncoder

            self.text = FrozenTextEncoder(text_encoder, text_max_length)
        ctx_dim = self.text.dim if self.text is not None else None
        self.caption_key, self.sample_posterior, self.chunk_frames = caption_key, sample_posterior, chunk_frames
        c_in = self.input_shape[0]
        args = (chans, num_res_blocks, z_channels, mid_attention, set(levels), ctx_dim, head_dim, max_frames)
        self.encoder = SpatialEncoder(c_in, *args)
        self.decoder = SpatialDecoder(c_in, *args)
        self.quant_conv = nn.Conv3d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv3d(z_channels, z_channels, 1)
        self.temporal = (TemporalCompressor(z_channels, hidden, temporal_spatial_kernel, ctx_dim, head_dim)
                         if temporal_compressor else None)
        for m in self.modules():
            # every norm, the shared blocks' included: GroupNorm-32 (SD's) at full width; CPU-sized models on
            # 2x2 latents need fewer groups, or a group normalises a handful of values and erases the content
            if isinstance(m, FrameGroupNorm):
                m.num_groups = math.gcd(m.num_channels, norm_groups)
        if init_2d:
            inflate_from_2d(self, load_2d_state(init_2d))
        self.check_shape(self.input_shape, video=True)

    # -- shapes and conditions -------------------------------------------------------------------
    def check_shape(self, shape, video: bool) -> None:
        t, hw = shape[1], shape[2:]
        bad = [s for s in hw if s % self.spatial_factor]
        if bad:
            raise ValueError(f"VideoVAEPlus: height/width {tuple(hw)} must be multiples of {self.spatial_factor} "
                             f"(2^(len(channel_mult)-1))")
        if video and t % self.temporal_factor:
            raise ValueError(f"VideoVAEPlus: {t} frames is not a multiple of the temporal factor "
                             f"{self.temporal_factor} (data.frames)")

    def condition(self, batch: dict) -> Cond:
        x = batch["x"]
        is_image = batch.get("is_image")
        if is_image is not None:
            flags = torch.as_tensor(is_image).bool().view(-1)
            if bool(flags.any()) and not bool(flags.all()):
                raise ValueError("VideoVAEPlus takes a batch of videos or a batch of images (is_image all equal), "
                                 "as the reference's joint training and the video DataModule's joint mode do")
            image = bool(flags.all())
        else:
            image = x.shape[2] == 1
        ctx = mask = None
        if self.text is not None:
            caps = batch.get(self.caption_key)
            if caps is None:
                raise KeyError(f"VideoVAEPlus has a text encoder (model.text_encoder) but the batch has no "
                               f"{self.caption_key!r}: give the data captions, or set model.text_encoder=null")
            ctx, mask = self.text(list(caps))
            ctx, mask = ctx.to(x.device), mask.to(x.device)
        return Cond(image or x.shape[2] == 1, ctx, mask)

    # -- encode / decode ---------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor, cond: Cond, sample: bool) -> dict[str, torch.Tensor]:
        """The final posterior: through the compressor for videos; straight from the spatial AE for images
        (and for every clip when the compressor is off). Also the spatial latent z_s."""
        video = not cond.mask_temporal and self.temporal is not None
        self.check_shape(x.shape[1:], video=video)
        mu_s, logvar_s, z_s = gaussian(self.quant_conv(self.encoder(x, cond)), sample)
        if not video:
            return {"mu": mu_s, "logvar": logvar_s, "z": z_s, "z_s": z_s}
        mu, logvar, z = gaussian(self.temporal.encode(z_s, cond), sample)
        return {"mu": mu, "logvar": logvar, "z": z, "z_s": z_s}

    def decode(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        if not cond.mask_temporal and self.temporal is not None:
            z = self.temporal.decode(z, cond)
        return self.decoder(self.post_quant_conv(z), cond)

    def forward(self, batch):
        cond = self.condition(batch)
        post = self.posterior(batch["x"], cond, sample=self.training and self.sample_posterior)
        return {"recon": self.decode(post["z"], cond), "mu": post["mu"], "logvar": post["logvar"], "z": post["z"]}

    # -- the video contract --------------------------------------------------------------------------
    def latents(self, batch) -> dict[str, torch.Tensor]:
        """Every tensor the decoder needs from the clip: the final posterior mean, (B, z, T/4, H/8, W/8) for
        videos, (B, z, T, H/8, W/8) for images. The decoder also reads the caption (text conditioning), which
        both ends have and which is not counted as latent."""
        cond = self.condition(batch)
        return {"z": self.posterior(batch["x"], cond, sample=False)["mu"]}

    @torch.no_grad()
    def reconstruct(self, batch):
        """Posterior-mean reconstruction; clips longer than `chunk_frames` go through in chunks of that length
        (bounded memory; each chunk is an independent clip, as the model is trained)."""
        x, step = batch["x"], self.chunk_frames
        parts = []
        for i in range(0, x.shape[2], step):
            part = {**batch, "x": x[:, :, i: i + step]}
            cond = self.condition(part)
            parts.append(self.decode(self.posterior(part["x"], cond, sample=False)["mu"], cond))
        return torch.cat(parts, dim=2)

    def encode(self, batch):
        """(B, D) features for probes: the flattened final posterior mean."""
        return self.latents(batch)["z"].flatten(1)

    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


# -- 2-D -> 3-D inflation -----------------------------------------------------------------------------
# diffusers' older attention names (checkpoints saved before its Attention refactor)
_LEGACY = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
# diffusers' ResnetBlock2D names -> the shared ResBlock2p1d's
_RENAME = {".conv_shortcut.": ".skip."}


def inflate_weight(w: torch.Tensor, kt: int) -> torch.Tensor:
    """A 2-D kernel (out, in, kh, kw) as a 3-D one (out, in, kt, kh, kw): the 2-D kernel at the centre frame,
    zeros elsewhere, so on a static clip (and on one frame) the 3-D conv equals the 2-D one."""
    out = w.new_zeros(w.shape[0], w.shape[1], kt, *w.shape[2:])
    out[:, :, kt // 2] = w
    return out


def load_2d_state(path: str) -> dict[str, torch.Tensor]:
    """A 2-D image VAE's weights: a diffusers AutoencoderKL folder (or its `vae/` subfolder of a pipeline) or
    .safetensors file, or a torch checkpoint (an aeforge run's .ckpt, or a bare state dict)."""
    p = Path(path)
    if p.is_dir():
        found = [q for q in (p / "diffusion_pytorch_model.safetensors", p / "vae" / "diffusion_pytorch_model."
                             "safetensors") if q.is_file()]
        if not found:
            raise FileNotFoundError(f"model.init_2d={path}: no diffusion_pytorch_model.safetensors there or in vae/")
        p = found[0]
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise FileNotFoundError(f"model.init_2d: no such file {p}")
        from safetensors.torch import load_file

        return load_file(str(p))
    from aeforge.checkpoints import load_checkpoint

    return model_state_dict(load_checkpoint(p, what="model.init_2d"))


def inflate_from_2d(model: VideoVAEPlus, state_2d: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy a 2-D image VAE (diffusers AutoencoderKL layout) into the spatial path of `model`. Every 2-D tensor
    must find its place with its shape (else an error naming it); the temporal branches, temporal attention,
    text cross-attention and the temporal compressor keep their initialisation, which is the identity for the
    first three (zeroed last projections). Returns {"loaded": [...], "kept_init": [...]}."""
    own = model.state_dict()
    mapped = {}
    for key, value in state_2d.items():
        k = key
        for old, new in {**_LEGACY, **_RENAME}.items():
            k = k.replace(old, new)
        if k not in own:
            raise KeyError(f"inflate_from_2d: 2-D tensor {key!r} has no place in the video model (not an "
                           f"AutoencoderKL-layout checkpoint, or another channel_mult / num_res_blocks)")
        if value.dim() == 4 and own[k].dim() == 2:  # legacy 1x1-conv attention projections
            value = value[:, :, 0, 0]
        elif value.dim() == 4 and own[k].dim() == 5:
            value = inflate_weight(value, own[k].shape[2])
        if tuple(value.shape) != tuple(own[k].shape):
            raise ValueError(f"inflate_from_2d: {key!r} is {tuple(value.shape)} in the 2-D checkpoint and "
                             f"{tuple(own[k].shape)} in the video model (channels / z_channels differ)")
        mapped[k] = value
    missing_spatial = [k for k in own if k not in mapped and not _added_for_video(k)]
    if missing_spatial:
        raise KeyError(f"inflate_from_2d: the 2-D checkpoint lacks {missing_spatial[:4]} ... of the spatial path")
    model.load_state_dict(mapped, strict=False)
    return {"loaded": sorted(mapped), "kept_init": sorted(k for k in own if k not in mapped)}


def _added_for_video(key: str) -> bool:
    return key.startswith(("temporal.", "text.")) or any(
        s in key for s in (".tconv1.", ".tconv2.", "temporal_attentions", "cross_attentions"))

