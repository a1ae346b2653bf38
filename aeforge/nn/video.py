"""Shared 3-D blocks for video autoencoders, on (B, C, T, H, W) tensors.

Causality in time follows the "first frame alone" convention of causal video VAEs: a layer that changes the
frame rate by r maps 1 + r*k frames to 1 + k (down) or back (up). Output frame 0 sees input frame 0 only;
output i sees input frames <= r*i. A strided `CausalConv3d` pads kt - 1 past frames; the temporal
(un)shuffles and `Upsample3d` with `first_frame=True` pad r - 1 copies of the first frame (down) or drop the
first r - 1 frames (up). With stride 1 this is plain causality (output t sees frames <= t). Normalisation is
per frame (`FrameGroupNorm`), since a GroupNorm over (T, H, W) would let the last frame change the first.

Streaming: inside `with streaming(model):` every `CausalConv3d` (and causal `TemporalAttention`) keeps the
trailing frames it has not finished using, and the first-frame pads/drops happen on the first chunk only, so a
clip fed chunk by chunk (1 + r*m frames, then r*m at a time) gives the same output as the whole clip at once
(`chunked` runs a function over chunks this way), with memory bounded by the chunk length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _triple(v: int | tuple[int, int, int] | list[int], name: str) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    if len(v) != 3:
        raise ValueError(f"{name} must be an int or 3 ints (t, h, w), got {v!r}")
    return (int(v[0]), int(v[1]), int(v[2]))


def norm_groups(channels: int, groups: int = 32) -> int:
    """The largest group count <= `groups` that divides `channels` (GroupNorm-32 for wide layers)."""
    return math.gcd(channels, groups)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm computed per frame: statistics over (C/groups, H, W), never across time (keeps causality)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__(norm_groups(channels, groups), channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class _Streamable(nn.Module):
    """A module that can carry state between chunks of one clip (see `streaming`)."""

    _stream: bool = False

    def start_stream(self) -> None:
        self._stream, self._cache, self._started = True, None, False

    def end_stream(self) -> None:
        self._stream, self._cache, self._started = False, None, False

    def _first_chunk(self) -> bool:
        """True outside streaming and on the first chunk of a stream (then marks the stream as started)."""
        if not self._stream:
            return True
        first = not self._started
        self._started = True
        return first


class CausalConv3d(_Streamable):
    """Conv3d that pads time only on the past side; spatial padding is symmetric ("same" at stride 1).

    Temporal padding is kt - 1 frames, copies of the first frame (`pad_mode="replicate"`) or zeros, so
    1 + st*k frames give 1 + k outputs and output i sees input frames <= st*i (see module doc).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        pad_mode: str = "replicate",
        bias: bool = True,
    ):
        super().__init__()
        if pad_mode not in ("replicate", "zeros"):
            raise ValueError(f"pad_mode must be one of ['replicate', 'zeros'], got {pad_mode!r}")
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        kt, kh, kw = self.kernel_size
        if kt < self.stride[0]:
            raise ValueError(f"temporal kernel {kt} is shorter than the temporal stride {self.stride[0]}")
        self.time_pad = kt - 1
        self.pad_mode = pad_mode
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel_size, self.stride,
                              padding=(0, kh // 2, kw // 2), bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def _past(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad == 0:
            return x
        first = x[:, :, :1]
        pad = first.expand(-1, -1, self.time_pad, -1, -1) if self.pad_mode == "replicate" else torch.zeros_like(
            first).expand(-1, -1, self.time_pad, -1, -1)
        return torch.cat([pad, x], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = getattr(self, "_cache", None) if self._stream else None
        x = self._past(x) if cache is None else torch.cat([cache, x], 2)
        kt, st = self.kernel_size[0], self.stride[0]
        n = (x.shape[2] - kt) // st + 1 if x.shape[2] >= kt else 0
        if self._stream:
            # frames from the next window's start on are still needed by the next chunk
            self._cache = x[:, :, n * st:]
        if n == 0:
            raise ValueError(f"CausalConv3d got {x.shape[2]} frames (with its cache/padding); the temporal "
                             f"kernel needs {kt}: use longer chunks")
        return self.conv(x[:, :, : (n - 1) * st + kt])


@contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Within the block, the streamable layers of `module` carry their past frames from call to call."""
    layers = [m for m in module.modules() if isinstance(m, _Streamable)]
    for m in layers:
        m.start_stream()
    try:
        yield
    finally:
        for m in layers:
            m.end_stream()


def chunk_spans(frames: int, first: int, size: int) -> list[tuple[int, int]]:
    """[start, end) spans: `first` frames, then `size` at a time (the last span may be shorter)."""
    if first < 1 or size < 1:
        raise ValueError(f"chunk sizes must be >= 1, got first={first}, size={size}")
    spans, start, end = [], 0, min(first, frames)
    while start < frames:
        spans.append((start, end))
        start, end = end, min(end + size, frames)
    return spans


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
            first: int, size: int) -> torch.Tensor:
    """fn(x) computed chunk by chunk along time (dim 2) with `module`'s layers streaming; the outputs are
    concatenated along time. Equal to fn(x) when every temporal op in fn is causal and chunk-aligned."""
    with streaming(module):
        outs = [fn(x[:, :, a:b]) for a, b in chunk_spans(x.shape[2], first, size)]
    return torch.cat(outs, 2)


def pixel_unshuffle_3d(x: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*rt*rh*rw, T/rt, H/rh, W/rw); channel index = c*rt*rh*rw + sub-position
    (channel-major, as torch's 2-D pixel_unshuffle)."""
    rt, rh, rw = factors
    b, c, t, h, w = x.shape
    if t % rt or h % rh or w % rw:
        raise ValueError(f"pixel_unshuffle_3d: shape (T, H, W)={(t, h, w)} is not divisible by {factors}")
    x = x.reshape(b, c, t // rt, rt, h // rh, rh, w // rw, rw)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * rt * rh * rw, t // rt, h // rh, w // rw)


def pixel_shuffle_3d(x: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of pixel_unshuffle_3d."""
    rt, rh, rw = factors
    b, c, t, h, w = x.shape
    r = rt * rh * rw
    if c % r:
        raise ValueError(f"pixel_shuffle_3d: {c} channels are not divisible by {rt}*{rh}*{rw}")
    x = x.reshape(b, c // r, rt, rh, rw, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // r, t * rt, h * rh, w * rw)


def pad_first_frame(x: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend n copies of frame 0 (dim 2)."""
    return x if n == 0 else torch.cat([x[:, :, :1].expand(-1, -1, n, -1, -1), x], 2)


class PixelUnshuffle3d(_Streamable):
    """Space-and-time to channels (see pixel_unshuffle_3d). `first_frame=True`: 1 + rt*k frames -> 1 + k, the
    first frame alone (rt - 1 copies of it are prepended, on the first chunk of a stream only)."""

    def __init__(self, factors: tuple[int, int, int] | list[int] = (2, 2, 2), first_frame: bool = False):
        super().__init__()
        self.factors = _triple(factors, "factors")
        self.first_frame = first_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_frame and self._first_chunk():
            x = pad_first_frame(x, self.factors[0] - 1)
        return pixel_unshuffle_3d(x, self.factors)


class PixelShuffle3d(_Streamable):
    """Channels to space-and-time (see pixel_shuffle_3d). `first_frame=True`: 1 + k frames -> 1 + rt*k (the
    first rt - 1 output frames are dropped, on the first chunk of a stream only)."""

    def __init__(self, factors: tuple[int, int, int] | list[int] = (2, 2, 2), first_frame: bool = False):
        super().__init__()
        self.factors = _triple(factors, "factors")
        self.first_frame = first_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = pixel_shuffle_3d(x, self.factors)
        return y[:, :, self.factors[0] - 1:] if self.first_frame and self._first_chunk() else y


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Average groups of consecutive channels down to `out_channels` (parameter-free shortcut)."""
    b, c = x.shape[:2]
    if c % out_channels:
        raise ValueError(f"channel_average: {c} channels do not split into {out_channels} equal groups")
    return x.reshape(b, out_channels, c // out_channels, *x.shape[2:]).mean(2)


def channel_duplicate(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Repeat each channel (consecutively) up to `out_channels` (parameter-free shortcut)."""
    c = x.shape[1]
    if out_channels % c:
        raise ValueError(f"channel_duplicate: {out_channels} channels are not a multiple of {c}")
    return x.repeat_interleave(out_channels // c, dim=1)


class DualPathDown(nn.Module):
    """conv path + shortcut path, both ending at `out_channels` with (T, H, W) divided by `factors`
    (time: 1 + rt*k -> 1 + k).

    conv path: causal conv to out/r channels, then pixel-unshuffle (r = rt*rh*rw) -> out;
    shortcut: pixel-unshuffle -> in*r channels, then channel averaging -> out. With factors (1, 1, 1) this is
    a channel-reducing conv plus channel averaging (the encoder's last layer)."""

    def __init__(self, in_channels: int, out_channels: int,
                 factors: tuple[int, int, int] | list[int] = (2, 2, 2), kernel_size: int = 3):
        super().__init__()
        self.factors = _triple(factors, "factors")
        r = math.prod(self.factors)
        if out_channels % r or (in_channels * r) % out_channels:
            raise ValueError(f"DualPathDown: out_channels={out_channels} must be a multiple of {r} and divide "
                             f"in_channels*{r}={in_channels * r}")
        self.out_channels = out_channels
        self.conv = CausalConv3d(in_channels, out_channels // r, kernel_size)
        # two unshuffles: each tracks its own first chunk
        self.unshuffle_conv = PixelUnshuffle3d(self.factors, first_frame=True)
        self.unshuffle_short = PixelUnshuffle3d(self.factors, first_frame=True)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return channel_average(self.unshuffle_short(x), self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unshuffle_conv(self.conv(x)) + self.shortcut(x)


class DualPathUp(nn.Module):
    """Mirror of DualPathDown: conv to out*r channels then pixel-shuffle, plus channel duplication to out*r
    then pixel-shuffle (nearest-neighbour upsampling of channel groups); time: 1 + k -> 1 + rt*k."""

    def __init__(self, in_channels: int, out_channels: int,
                 factors: tuple[int, int, int] | list[int] = (2, 2, 2), kernel_size: int = 3):
        super().__init__()
        self.factors = _triple(factors, "factors")
        r = math.prod(self.factors)
        if (out_channels * r) % in_channels:
            raise ValueError(f"DualPathUp: out_channels*{r}={out_channels * r} must be a multiple of "
                             f"in_channels={in_channels}")
        self.out_channels = out_channels
        self.conv = CausalConv3d(in_channels, out_channels * r, kernel_size)
        self.shuffle_conv = PixelShuffle3d(self.factors, first_frame=True)
        self.shuffle_short = PixelShuffle3d(self.factors, first_frame=True)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle_short(channel_duplicate(x, self.out_channels * math.prod(self.factors)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle_conv(self.conv(x)) + self.shortcut(x)


class Upsample3d(_Streamable):
    """Nearest x2 in space (and in time when `temporal`: 1 + k -> 1 + 2k frames, the first frame alone),
    then a causal conv k3."""

    def __init__(self, channels: int, temporal: bool, out_channels: int | None = None):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, out_channels or channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=(2 if self.temporal else 1, 2, 2), mode="nearest")
        if self.temporal and self._first_chunk():
            y = y[:, :, 1:]
        return self.conv(y)


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-causal conv k3, twice, plus a (1x1x1 if the width changes) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = FrameGroupNorm(in_channels), CausalConv3d(in_channels, out_channels, 3)
        self.norm2, self.conv2 = FrameGroupNorm(out_channels), CausalConv3d(out_channels, out_channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class ResBlock2p1d(nn.Module):
    """(2+1)-D residual block: per-frame 3x3 convs, each followed (when `temporal`) by a residual temporal
    conv k3 that starts at zero — so a block inflated from 2-D weights first behaves as the image block.

    `mask_temporal=True` in forward skips the temporal convs (images fed as frames in joint training)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool = True, causal: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.temporal = temporal
        self.norm1 = FrameGroupNorm(in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.norm2 = FrameGroupNorm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        if temporal:
            self.tconv1, self.tconv2 = (self._temporal_conv(out_channels, causal) for _ in range(2))

    @staticmethod
    def _temporal_conv(ch: int, causal: bool) -> nn.Module:
        conv = (CausalConv3d(ch, ch, (3, 1, 1)) if causal
                else nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate"))
        inner = conv.conv if causal else conv
        nn.init.zeros_(inner.weight)
        nn.init.zeros_(inner.bias)
        return conv

    def forward(self, x: torch.Tensor, mask_temporal: bool = False) -> torch.Tensor:
        use_t = self.temporal and not mask_temporal
        h = self.conv1(F.silu(self.norm1(x)))
        if use_t:
            h = h + self.tconv1(h)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if use_t:
            h = h + self.tconv2(h)
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Per-frame self-attention over the H*W positions (pre-norm, residual)."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SpatialAttention: heads={heads} must divide channels={channels}")
        self.heads = heads
        self.norm = FrameGroupNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        q, k, v = self.qkv(tokens).reshape(b * t, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * t, h * w, c)
        y = self.proj(y).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + y


class TemporalAttention(_Streamable):
    """Self-attention over time at each spatial position (pre-norm, residual, output projection zero-init so
    an inflated image model starts unchanged), with a learned relative-position bias clipped at `max_len`.

    `causal=True` masks later frames; it then also streams (a key/value cache of past frames), so chunked
    and whole-clip outputs agree. Non-causal attention needs the whole clip and refuses to stream."""

    def __init__(self, channels: int, heads: int = 1, causal: bool = True, max_len: int = 64):
        super().__init__()
        if channels % heads:
            raise ValueError(f"TemporalAttention: heads={heads} must divide channels={channels}")
        self.heads, self.causal, self.max_len = heads, causal, max_len
        self.norm = FrameGroupNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * max_len - 1))

    def forward(self, x: torch.Tensor, mask_temporal: bool = False) -> torch.Tensor:
        if mask_temporal:
            return x
        if self._stream and not self.causal:
            raise ValueError("TemporalAttention(causal=False) sees the whole clip; it cannot run chunked")
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        q, k, v = self.qkv(tokens).reshape(b * h * w, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        cache = getattr(self, "_cache", None) if self._stream else None
        if cache is not None:
            past = cache[0].shape[2]
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        if self._stream:
            self._cache = (k, v)
        qpos = torch.arange(past, past + t, device=x.device)
        kpos = torch.arange(past + t, device=x.device)
        rel = (qpos[:, None] - kpos[None, :]).clamp(-self.max_len + 1, self.max_len - 1) + self.max_len - 1
        bias = self.rel_bias[:, rel].unsqueeze(0)  # (1, heads, t, past + t)
        if self.causal:
            bias = bias.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        y = self.proj(y.transpose(1, 2).reshape(b * h * w, t, c))
        return x + y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
