"""Shared 3-D video blocks (aeforge/nn/video.py): causal padding leaks no future frame, chunked streaming equals
the whole-clip pass, 3-D (un)shuffle round-trips, the parameter-free shortcuts are pooling / nearest upsampling,
temporal switches, and errors on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aeforge.nn.video import (
    CausalConv3d,
    DualPathDown,
    DualPathUp,
    PixelShuffle3d,
    PixelUnshuffle3d,
    ResBlock2p1d,
    ResBlock3d,
    SpatialAttention,
    TemporalAttention,
    Upsample3d,
    channel_average,
    channel_duplicate,
    chunk_spans,
    chunked,
    pixel_unshuffle_3d,
)


def _clip(t: int = 9, c: int = 4, s: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, c, t, s, s, generator=torch.Generator().manual_seed(seed))


def _rand_init(m: nn.Module) -> nn.Module:
    # zero-initialised residual branches would make the leak/stream tests vacuous
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


class _Stack(nn.Module):
    """Every streamable kind: causal convs (stride 1 and 2), causal temporal attention, a first-frame
    unshuffle/shuffle pair, temporal upsampling, (2+1)-D and 3-D blocks, spatial attention."""

    def __init__(self):
        super().__init__()
        self.a = CausalConv3d(4, 8, 3)
        self.att = TemporalAttention(8, heads=2, causal=True, max_len=4)
        self.down = CausalConv3d(8, 8, 3, stride=(2, 1, 1))
        self.r = ResBlock2p1d(8, 8, temporal=True)
        self.dual = DualPathDown(8, 16, (2, 2, 2))
        self.undual = DualPathUp(16, 8, (2, 2, 2))
        self.up = Upsample3d(8, temporal=True)
        self.r3 = ResBlock3d(8, 8)
        self.sa = SpatialAttention(8, heads=2)

    def encode(self, x):
        return self.dual(self.r(self.down(self.att(self.a(x)))))

    def forward(self, x):
        return self.sa(self.r3(self.up(self.undual(self.encode(x)))))


@pytest.mark.parametrize("stride", [1, 2])
def test_causal_conv_leaks_no_future_frame(stride):
    conv = CausalConv3d(4, 5, 3, stride=(stride, 1, 1))
    x = _clip()
    t = 4
    x2 = x.clone()
    x2[:, :, t] += 10.0
    y, y2 = conv(x), conv(x2)
    assert y.shape[2] == 1 + (x.shape[2] - 1) // stride  # 1 + s*k frames -> 1 + k
    # output i sees input frames <= stride*i: those before frame t are unchanged, the first to see it changes
    first_seeing_t = -(-t // stride)
    assert torch.equal(y[:, :, :first_seeing_t], y2[:, :, :first_seeing_t])
    assert not torch.allclose(y[:, :, first_seeing_t], y2[:, :, first_seeing_t])


def test_stack_is_causal_and_chunked_equals_whole():
    # float64: the comparison is about the streaming logic, not float32 summation order
    m = _rand_init(_Stack()).double().eval()
    x = _clip(t=17, s=4).double()
    with torch.no_grad():
        whole, code = m(x), m.encode(x)
        # temporal factor 4: chunks of 1 + 4*m frames, then 4*m
        parts = chunked(m, m, x, first=5, size=4)
        code_parts = chunked(m.encode, m, x, first=9, size=8)
        x2 = x.clone()
        x2[:, :, 9] = torch.randn_like(x2[:, :, 9])
        pert, code_pert = m(x2), m.encode(x2)
    assert code.shape == (2, 16, 5, 2, 2) and whole.shape == (2, 8, 17, 8, 8)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(code_parts, code)
    # latent i sees frames <= 4i: frame 9 first reaches latent 3; the decoder output first changes at frame 9
    assert torch.equal(code_pert[:, :, :3], code[:, :, :3])
    assert not torch.allclose(code_pert[:, :, 3], code[:, :, 3])
    assert torch.equal(pert[:, :, :9], whole[:, :, :9])
    assert not torch.allclose(pert[:, :, 9], whole[:, :, 9])
    # streaming state is dropped on exit: a later whole-clip call is unaffected
    with torch.no_grad():
        torch.testing.assert_close(m(x), whole)


def test_chunk_spans():
    assert chunk_spans(33, 17, 16) == [(0, 17), (17, 33)]
    assert chunk_spans(20, 17, 16) == [(0, 17), (17, 20)]
    assert chunk_spans(5, 17, 16) == [(0, 5)]
    with pytest.raises(ValueError, match="chunk sizes"):
        chunk_spans(5, 0, 16)


def test_shuffle_unshuffle_identity_and_shortcuts():
    x = _clip(t=4, c=3, s=8)
    un, sh = PixelUnshuffle3d((2, 2, 2)), PixelShuffle3d((2, 2, 2))
    assert un(x).shape == (2, 24, 2, 4, 4)
    assert torch.equal(sh(un(x)), x)
    z = torch.randn(2, 16, 2, 3, 3)
    assert torch.equal(un(sh(z)), z)
    # the first-frame convention: 1 + 2k frames <-> 1 + k, still an exact round trip
    x5 = _clip(t=5, c=3, s=4)
    un1, sh1 = PixelUnshuffle3d((2, 2, 2), first_frame=True), PixelShuffle3d((2, 2, 2), first_frame=True)
    assert un1(x5).shape == (2, 24, 3, 2, 2)
    assert torch.equal(sh1(un1(x5)), x5)
    # channel average over a whole sub-position group = 2x2x2 average pooling of each channel
    pooled = channel_average(pixel_unshuffle_3d(x, (2, 2, 2)), 3)
    torch.testing.assert_close(pooled, nn.functional.avg_pool3d(x, 2))
    # channel duplication then shuffle = nearest-neighbour upsampling
    up = sh(channel_duplicate(pooled, 24))
    torch.testing.assert_close(up, pooled.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4))


def test_dual_path_with_zero_conv_is_the_shortcut():
    down, up = DualPathDown(4, 16, (2, 2, 2)), DualPathUp(16, 4, (2, 2, 2))
    for m in (down, up):
        nn.init.zeros_(m.conv.weight)
        nn.init.zeros_(m.conv.conv.bias)
    x = _clip(t=5, c=4, s=4)
    h = down(x)
    assert h.shape == (2, 16, 3, 2, 2)
    torch.testing.assert_close(h, down.shortcut(x))
    assert up(h).shape == x.shape
    # the shortcut round trip is exact on a clip constant on each block: frame 0 alone, then frame pairs,
    # 2x2 pixels
    blocks = torch.randn(1, 4, 3, 2, 2)
    blocky = torch.cat([blocks[:, :, :1], blocks[:, :, 1:].repeat_interleave(2, 2)], 2)
    blocky = blocky.repeat_interleave(2, 3).repeat_interleave(2, 4)
    torch.testing.assert_close(up(down(blocky)), blocky)


def test_resblock_2p1d_temporal_switch():
    x = _clip(t=5, c=4)
    spatial = _rand_init(ResBlock2p1d(4, 8, temporal=False))
    y = spatial(x)
    # no temporal op: each frame is processed alone
    torch.testing.assert_close(y[:, :, 2:3], spatial(x[:, :, 2:3]))
    full = ResBlock2p1d(4, 8, temporal=True)
    # temporal convs start at zero: the inflated block first equals its image block
    full.load_state_dict(spatial.state_dict(), strict=False)
    torch.testing.assert_close(full(x), y)
    _rand_init(full)
    assert not torch.allclose(full(x), full(x, mask_temporal=True))
    assert full(x).shape == (2, 8, 5, 6, 6)


def test_temporal_attention_relative_bias_and_mask():
    att = _rand_init(TemporalAttention(8, heads=2, causal=False, max_len=3))
    x = _clip(t=6, c=8)
    y = att(x)
    x2 = x.clone()
    x2[:, :, 5] = torch.randn_like(x2[:, :, 5])  # a constant shift would vanish in the per-frame norm
    assert not torch.allclose(att(x2)[:, :, 0], y[:, :, 0])  # non-causal sees the future
    assert torch.equal(att(x, mask_temporal=True), x)
    with pytest.raises(ValueError, match="cannot run chunked"):
        chunked(att, att, x, 2, 2)
    assert torch.equal(TemporalAttention(8)(x), x)  # zero-init output projection


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="pad_mode must be one of"):
        CausalConv3d(2, 2, 3, pad_mode="circular")
    with pytest.raises(ValueError, match="shorter than the temporal stride"):
        CausalConv3d(2, 2, (1, 3, 3), stride=(2, 1, 1))
    with pytest.raises(ValueError, match="not divisible"):
        pixel_unshuffle_3d(torch.zeros(1, 2, 3, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="equal groups"):
        channel_average(torch.zeros(1, 6, 1, 1, 1), 4)
    with pytest.raises(ValueError, match="DualPathDown"):
        DualPathDown(4, 12, (2, 2, 2))
    with pytest.raises(ValueError, match="heads"):
        SpatialAttention(6, heads=4)
