"""Hi-VAE's blocks (card 1 of /work/shared/methods/vae_video_generative.md): learnable-query transformer
encoders (per frame; per spatial location over time), the 3-D FFT frequency filter, and the conditional
rectified-flow DiT decoder (joint attention between image tokens and condition tokens, temporal attention,
AdaLN-zero from the flow time).

Shapes: latent videos are (B, T, C, H, W) here (frames first, as the per-frame image VAE emits them); motion
tokens are (B, T, S, C) (global: S positions per frame) and (B, T, N, C) (detailed: N tokens per frame)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aeforge.nn.diffusion import timestep_embedding
from aeforge.nn.vit import sincos_1d, sincos_2d

# -- the 3-D frequency filter ---------------------------------------------------------------------------


def gaussian_lowpass(shape: tuple[int, ...], cutoffs: tuple[float, ...], device=None) -> torch.Tensor:
    """Gaussian low-pass mask over centred frequencies, one cutoff per axis: exp(-½ Σ (f̃_i / d_i)²), f̃_i the
    frequency coordinate of axis i normalised to [-1, 1) (card 1, [code]). d → 0: only DC passes."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) * 2 / n - 1 for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-0.5 * sum((g / d) ** 2 for g, d in zip(grids, cutoffs)))


def _filter(x: torch.Tensor, cutoffs: tuple[float, ...], kind: str) -> torch.Tensor:
    if kind not in ("low", "high"):
        raise ValueError(f"frequency filter kind must be low or high, got {kind!r}")
    dims = tuple(range(-len(cutoffs), 0))
    spec = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)
    mask = gaussian_lowpass(tuple(x.shape[-len(cutoffs):]), cutoffs, x.device)
    if kind == "high":
        mask = 1 - mask
    out = torch.fft.ifftn(torch.fft.ifftshift(spec * mask, dim=dims), dim=dims).real
    return out.to(x.dtype)


def frequency_filter_3d(x: torch.Tensor, d_s: float, d_t: float, kind: str = "low") -> torch.Tensor:
    """Low- or high-pass (1 - P) filter of `x` (..., T, H, W) in the centred 3-D Fourier domain; real output."""
    return _filter(x, (d_t, d_s, d_s), kind)


def frequency_filter_2d(x: torch.Tensor, d_s: float, kind: str = "high") -> torch.Tensor:
    """The same Gaussian filter over (H, W) only, each frame on its own."""
    return _filter(x, (d_s, d_s), kind)


# -- attention blocks -----------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention (self, or cross to `context`), LayerNorm on queries and keys per head (the
    reference's qk-norm, which keeps wide joint attention stable)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        head = dim // heads
        self.q_norm = nn.LayerNorm(head, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(approximate="tanh"), nn.Linear(mult * dim, dim))


class SelfBlock(nn.Module):
    """Pre-norm transformer block: self-attention, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.ff = nn.LayerNorm(dim), feed_forward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class CrossBlock(nn.Module):
    """Query block: self-attention among the queries, cross-attention to the context, MLP (all pre-norm)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.norm_ctx, self.cross = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), feed_forward(dim)

    def forward(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm1(q))
        q = q + self.cross(self.norm2(q), self.norm_ctx(context))
        return q + self.ff(self.norm3(q))


def _sincos(dim: int, n: int) -> torch.Tensor:
    return torch.from_numpy(sincos_1d(dim, np.arange(n))).float()


def keep_random_tokens(x: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
    """A random subset of `keep` tokens along `dim` (1 = token axis of (B, L, D); 2 = the spatial axis of
    (B, T, S, D), the same positions in every frame), per sample; order is preserved."""
    b, n = x.shape[0], x.shape[dim]
    ids = torch.rand(b, n, device=x.device).argsort(1)[:, :keep].sort(1).values
    shape = [b] + [1] * (x.dim() - 1)
    shape[dim] = keep
    index = ids.view(shape).expand(*[s if i != dim else keep for i, s in enumerate(x.shape)])
    return x.gather(dim, index)


def _mask_keep(n: int, mask_ratio: float, training: bool) -> int:
    # the reference's schedule: a masked share drawn per step (card 1); masking is a training-time augmentation
    if not training or mask_ratio <= 0:
        return n
    return max(1, int(n * (1 - mask_ratio * float(torch.rand(())))))


# -- learnable-query encoders ---------------------------------------------------------------------------


class PerFrameQueryEncoder(nn.Module):
    """Detailed-motion encoder: each frame's patch tokens (2-D sin-cos positions) with `num_queries` learnable
    query tokens prepended go through `depth` self-attention blocks; the queries are read out, LayerNorm,
    Linear -> `out_channels`. (B, T, C, H, W) -> (B, T, num_queries, out_channels)."""

    def __init__(self, in_channels: int, grid: tuple[int, int], patch_size: int, width: int, heads: int,
                 depth: int, num_queries: int, out_channels: int, mask_ratio: float = 0.0):
        super().__init__()
        gh, gw = grid[0] // patch_size, grid[1] // patch_size
        self.patch = nn.Conv2d(in_channels, width, patch_size, patch_size)
        self.register_buffer("pos", sincos_2d(width, (gh, gw))[None], persistent=False)
        self.queries = nn.Parameter(torch.randn(1, num_queries, out_channels) * 0.02)
        self.query_in = nn.Linear(out_channels, width)
        self.blocks = nn.ModuleList(SelfBlock(width, heads) for _ in range(depth))
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, out_channels)
        self.mask_ratio = mask_ratio

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t = z.shape[:2]
        tokens = self.patch(z.flatten(0, 1)).flatten(2).transpose(1, 2) + self.pos
        keep = _mask_keep(tokens.shape[1], self.mask_ratio, self.training)
        if keep < tokens.shape[1]:
            tokens = keep_random_tokens(tokens, keep, dim=1)
        q = self.query_in(self.queries).expand(tokens.shape[0], -1, -1)
        h = torch.cat([q, tokens], 1)
        for block in self.blocks:
            h = block(h)
        out = self.proj(self.norm(h[:, : q.shape[1]]))
        return out.view(b, t, *out.shape[1:])


class TemporalQueryEncoder(nn.Module):
    """Global-motion encoder: per spatial location, learnable temporal queries cross-attend to that location's
    sequence of frame tokens (2-D sin-cos + 1-D temporal sin-cos positions).
    `output="frames"` (the reference code): the `num_queries` queries are repeat-interleaved to the T frames
    (frame k takes query ⌊k·f_g/T⌋) and each copy gets its frame's temporal position: latent (B, T, S, C).
    `output="queries"` (the paper's q_g ∈ R^{f_g×n_g×c_g}): `num_queries` steps, (B, num_queries, S, C).
    Masking drops the same random spatial positions in every frame (training only), so S shrinks with it."""

    def __init__(self, in_channels: int, grid: tuple[int, int], frames: int, patch_size: int, width: int,
                 heads: int, depth: int, num_queries: int, out_channels: int, output: str = "frames",
                 mask_ratio: float = 0.0):
        super().__init__()
        if output not in ("frames", "queries"):
            raise ValueError(f"global encoder output must be frames or queries, got {output!r}")
        gh, gw = grid[0] // patch_size, grid[1] // patch_size
        self.frames, self.output, self.mask_ratio = frames, output, mask_ratio
        self.patch = nn.Conv2d(in_channels, width, patch_size, patch_size)
        self.register_buffer("pos", sincos_2d(width, (gh, gw))[None, None], persistent=False)
        self.register_buffer("time_pos", _sincos(width, max(frames, num_queries))[None], persistent=False)
        self.queries = nn.Parameter(torch.randn(1, num_queries, out_channels) * 0.02)
        self.query_in = nn.Linear(out_channels, width)
        self.blocks = nn.ModuleList(CrossBlock(width, heads) for _ in range(depth))
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t = z.shape[:2]
        if t > self.frames:
            raise ValueError(f"the global encoder was built for at most {self.frames} target frames, got {t}")
        tokens = self.patch(z.flatten(0, 1)).flatten(2).transpose(1, 2)
        tokens = tokens.view(b, t, *tokens.shape[1:]) + self.pos  # (B, T, S, D)
        tokens = tokens + self.time_pos[:, :t, None]
        keep = _mask_keep(tokens.shape[2], self.mask_ratio, self.training)
        if keep < tokens.shape[2]:
            tokens = keep_random_tokens(tokens, keep, dim=2)
        s = tokens.shape[2]
        context = tokens.permute(0, 2, 1, 3).flatten(0, 1)  # (B·S, T, D): one location's frames
        q = self.query_in(self.queries)
        if self.output == "frames":  # frame k gets query floor(k·f_g / T): repeat_interleave when f_g divides T
            q = q[:, torch.arange(t, device=q.device) * q.shape[1] // t]
        q = (q + self.time_pos[:, : q.shape[1]]).expand(b * s, -1, -1)
        for block in self.blocks:
            q = block(q, context)
        out = self.proj(self.norm(q))  # (B·S, T or f_g, C)
        return out.view(b, s, *out.shape[1:]).transpose(1, 2)


# -- the conditional rectified-flow DiT decoder ----------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class JointBlock(nn.Module):
    """MM-DiT style joint attention: condition and image tokens are concatenated for one attention and one MLP
    (shared weights), each stream with its own AdaLN-zero shift/scale/gate from the time embedding."""

    def __init__(self, dim: int, heads: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.ff = Attention(dim, heads), feed_forward(dim)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 12 * dim))
        nn.init.zeros_(self.mod[1].weight), nn.init.zeros_(self.mod[1].bias)  # adaLN-zero: starts as identity

    def forward(self, cond: torch.Tensor, img: torch.Tensor, temb: torch.Tensor):
        m = self.mod(temb).chunk(12, dim=-1)
        n = cond.shape[1]
        h = torch.cat([_modulate(self.norm(cond), m[0], m[1]), _modulate(self.norm(img), m[6], m[7])], 1)
        a = self.attn(h)
        cond, img = cond + m[2][:, None] * a[:, :n], img + m[8][:, None] * a[:, n:]
        h = torch.cat([_modulate(self.norm(cond), m[3], m[4]), _modulate(self.norm(img), m[9], m[10])], 1)
        f = self.ff(h)
        return cond + m[5][:, None] * f[:, :n], img + m[11][:, None] * f[:, n:]


class TemporalBlock(nn.Module):
    """Self-attention over the frames at each spatial position, AdaLN-zero from the time embedding."""

    def __init__(self, dim: int, heads: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.ff = Attention(dim, heads), feed_forward(dim)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 6 * dim))
        nn.init.zeros_(self.mod[1].weight), nn.init.zeros_(self.mod[1].bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        m = self.mod(temb).chunk(6, dim=-1)
        x = x + m[2][:, None] * self.attn(_modulate(self.norm(x), m[0], m[1]))
        return x + m[5][:, None] * self.ff(_modulate(self.norm(x), m[3], m[4]))


class FlowDiTDecoder(nn.Module):
    """Velocity of the target-frame latents given the reference latent, the flow time and the motion tokens.

    Per frame, the image tokens are the patch embedding of [z_ref ‖ z_t] (channel concat) with 2-D and temporal
    sin-cos positions. Each of `depth` layers: (i) joint attention with the detailed tokens [src, u_d(ref), tgt,
    u_d(frame)] (+ 1-D positions), (ii) joint attention with that frame's global tokens, (iii) temporal
    attention over the frames at each position; then AdaLN + Linear -> patches. A branch whose channels are
    None is not built (stage A has no detailed branch). Time is per clip, shared by its frames."""

    def __init__(self, latent_channels: int, grid: tuple[int, int], frames: int, patch_size: int, width: int,
                 heads: int, depth: int, time_dim: int, global_channels: int | None,
                 detail_channels: int | None, detail_tokens: int = 0):
        super().__init__()
        if global_channels is None and detail_channels is None:
            raise ValueError("the decoder needs at least one motion branch (global or detailed)")
        gh, gw = grid[0] // patch_size, grid[1] // patch_size
        self.c, self.p, self.grid, self.frames = latent_channels, patch_size, (gh, gw), frames
        self.patch = nn.Conv2d(2 * latent_channels, width, patch_size, patch_size)
        self.register_buffer("pos", sincos_2d(width, (gh, gw))[None], persistent=False)
        self.register_buffer("time_pos", _sincos(width, frames)[None], persistent=False)
        self.time = nn.Sequential(nn.Linear(width, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.width = width
        self.global_in = nn.Linear(global_channels, width) if global_channels else None
        self.global_blocks = nn.ModuleList(JointBlock(width, heads, time_dim) for _ in range(depth)) \
            if global_channels else None
        if detail_channels:
            self.detail_in = nn.Linear(detail_channels, width)
            self.src_token = nn.Parameter(torch.zeros(1, 1, width))
            self.tgt_token = nn.Parameter(torch.zeros(1, 1, width))
            self.register_buffer("detail_pos", _sincos(width, 2 * detail_tokens + 2)[None], persistent=False)
            self.detail_blocks = nn.ModuleList(JointBlock(width, heads, time_dim) for _ in range(depth))
        else:
            self.detail_in = self.detail_blocks = None
        self.temporal_blocks = nn.ModuleList(TemporalBlock(width, heads, time_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mod_out = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * width))
        self.out = nn.Linear(width, patch_size * patch_size * latent_channels)
        for layer in (self.mod_out[1], self.out):  # the velocity starts at 0
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, z_t: torch.Tensor, z_ref: torch.Tensor, t: torch.Tensor, u_g: torch.Tensor | None = None,
                u_d_ref: torch.Tensor | None = None, u_d: torch.Tensor | None = None) -> torch.Tensor:
        b, f, c, h, w = z_t.shape
        x = torch.cat([z_ref[:, None].expand_as(z_t), z_t], 2).flatten(0, 1)
        img = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B·F, L, D)
        n_tok = img.shape[1]
        img = (img.view(b, f, n_tok, -1) + self.time_pos[:, :f, None]).flatten(0, 1)
        temb = self.time(timestep_embedding(t, self.width, scale=1000.0))  # (B, time_dim)
        temb_frames = temb.repeat_interleave(f, 0)
        temb_pos = temb.repeat_interleave(n_tok, 0)
        g = d = None
        if self.global_blocks is not None:
            if u_g is None:
                raise ValueError("this decoder has a global-motion branch: u_g is required")
            if u_g.shape[1] != f:  # output="queries": f_g steps, spread linearly over the frames
                u_g = F.interpolate(u_g.permute(0, 2, 3, 1).flatten(1, 2), size=f, mode="linear",
                                    align_corners=True).view(b, *u_g.shape[2:], f).permute(0, 3, 1, 2)
            g = self.global_in(u_g.flatten(0, 1))  # (B·F, S, D)
        if self.detail_blocks is not None:
            if u_d is None or u_d_ref is None:
                raise ValueError("this decoder has a detailed-motion branch: u_d and u_d_ref are required")
            src = self.detail_in(u_d_ref).repeat_interleave(f, 0)  # (B·F, N, D)
            tgt = self.detail_in(u_d.flatten(0, 1))
            d = torch.cat([self.src_token.expand(b * f, -1, -1), src, self.tgt_token.expand(b * f, -1, -1), tgt], 1)
            d = d + self.detail_pos
        for i, temporal in enumerate(self.temporal_blocks):
            if d is not None:
                d, img = self.detail_blocks[i](d, img, temb_frames)
            if g is not None:
                g, img = self.global_blocks[i](g, img, temb_frames)
            seq = img.view(b, f, n_tok, -1).transpose(1, 2).flatten(0, 1)  # (B·L, F, D)
            seq = temporal(seq, temb_pos)
            img = seq.view(b, n_tok, f, -1).transpose(1, 2).flatten(0, 1)
        shift, scale = self.mod_out(temb_frames).chunk(2, dim=-1)
        out = self.out(_modulate(self.norm_out(img), shift, scale))  # (B·F, L, p·p·C)
        gh, gw = self.grid
        out = out.view(b, f, gh, gw, self.p, self.p, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, f, c, gh * self.p, gw * self.p)
