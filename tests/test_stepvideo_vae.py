"""Step-Video VAE (card 5): the 16x16x8 latent shapes and compression factor, causal block encoding, chunked
encode/decode equal to the whole clip, the dual-path ends reducing to their parameter-free shortcut when the
conv paths are zero, the stage-wise unfreezing schedule (frozen weights bit-identical until their step), a tiny
model that learns, the recipes' configs, and errors on bad input. Real-data proof: scripts/proof_stepvideo_vae.py
(`benchmark` test at the end)."""

from __future__ import annotations

import json

import pytest
import torch

from aeforge.models.base import RunProgress
from aeforge.models.stepvideo_vae import StepVideoVAE
from tests.conftest import compose_cfg, load_script, needs_data

TINY = dict(latent_channels=8, enc_channels=4, enc_mult=[2, 2, 4, 4], enc_blocks=1, dec_channels=4,
            dec_mult=[1, 1, 2, 2], dec_blocks=1, patch_channels=64)


def _model(t: int = 9, size: int = 16, seed: int = 0, **kw) -> StepVideoVAE:
    torch.manual_seed(seed)
    return StepVideoVAE([3, t, size, size], **{**TINY, **kw})


def _clip(t: int = 9, size: int = 16, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_latent_shapes_and_compression_factor():
    m = _model().eval()
    x = _clip()
    with torch.no_grad():
        z = m.latents({"x": x})["z"]
        out = m({"x": x})
    # 16x16 spatial, 8x temporal with the first frame alone: 9 = 1 + 8 frames -> 2 latent frames
    assert (m.spatial_factor, m.temporal_factor) == (16, 8)
    assert z.shape == (2, 8, 2, 1, 1)
    assert out["recon"].shape == x.shape and out["mu"].shape == out["logvar"].shape == z.shape
    assert m.encode({"x": x}).shape == (2, 8)
    # CF from the real shapes: 3*T*H*W / latent values; the full-size formula 3*8*16*16/64 = 96 per 8 frames
    assert x[0].numel() / z[0].numel() == 3 * 9 * 16 * 16 / (8 * 2)
    plain = _model(dual_path=False)  # the card's stage-1 4x8x8 VAE
    assert (plain.spatial_factor, plain.temporal_factor) == (8, 4)
    assert plain.latents({"x": _clip()})["z"].shape == (2, 8, 3, 2, 2)
    assert plain.conv_paths() == [] and len(m.conv_paths()) == 4


def test_encoder_is_causal_and_chunked_equals_whole():
    # float64: the comparison is about the chunk caches, not float32 summation order
    whole = _model(t=25, chunk_frames=25).double().eval()
    chunks = _model(t=25, chunk_frames=9).double().eval()
    chunks.load_state_dict(whole.state_dict())
    x = _clip(t=25, b=1).double()
    with torch.no_grad():
        z_whole, z_chunks = whole.latents({"x": x})["z"], chunks.latents({"x": x})["z"]
        assert z_whole.shape[2] == 4
        torch.testing.assert_close(z_chunks, z_whole)
        torch.testing.assert_close(chunks.decode(z_whole), whole.decode(z_whole))
        # latent i sees frames <= 8i: a change at frame 12 first reaches latent 2
        x2 = x.clone()
        x2[:, :, 12] = torch.rand_like(x2[:, :, 12])
        z2 = whole.latents({"x": x2})["z"]
    assert torch.equal(z2[:, :, :2], z_whole[:, :, :2]) and not torch.allclose(z2[:, :, 2], z_whole[:, :, 2])


def test_zero_conv_paths_leave_the_shortcut():
    m = _model(zero_conv_path=True).eval()
    assert all(c.weight.abs().sum() == 0 for c in m.conv_paths())
    x = _clip()
    with torch.no_grad():
        h = m.enc_dual[1](m.enc_dual[0](m.enc_mid(m.enc_backbone(x))))
        patch, out = m.enc_dual[2], m.enc_dual[3]
        expected = out.shortcut(patch.shortcut(h))
        mean, logvar = m.moments(x)
        torch.testing.assert_close(mean, expected[:, :8])
        torch.testing.assert_close(logvar, expected[:, 8:].clamp(-30.0, 20.0))
        up1, up2 = m.dec_dual
        torch.testing.assert_close(m.dec_dual(mean), up2.shortcut(up1.shortcut(mean)))


def test_stage_schedule_keeps_frozen_weights_bit_identical():
    m = _model(freeze=["enc_backbone", "dec_backbone", "enc_mid", "dec_mid"],
               freeze_schedule={2: {"unfreeze": ["enc_mid", "dec_mid"]}})
    frozen0 = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("enc_backbone", "enc_mid"))}
    dual0 = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("enc_dual")}
    # built with every parameter trainable (the optimiser must hold the ones unfrozen later)
    opt = torch.optim.Adam([p for p in m.parameters()], lr=1e-2)
    x = _clip()
    for step in range(3):
        loss = (m({"x": x, "progress": RunProgress.of(step, 3, 0)})["recon"] - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.on_train_step_end(step + 1, 3)
        state = m.state_dict()
        if step + 1 <= 2:  # updates 1 and 2 ran with the backbone and mid blocks frozen
            assert all(torch.equal(state[k], v) for k, v in frozen0.items())
    assert all(torch.equal(state[k], v) for k, v in frozen0.items() if k.startswith("enc_backbone"))
    assert not all(torch.equal(state[k], v) for k, v in frozen0.items() if k.startswith("enc_mid"))
    assert not all(torch.equal(state[k], v) for k, v in dual0.items())


def _moving_blob(t: int = 9, size: int = 16) -> torch.Tensor:
    """A smooth bright blob moving right: learnable in a few steps, unlike noise."""
    g = torch.arange(size, dtype=torch.float32)
    frames = [torch.exp(-((g[None, :] - 3 - i) ** 2 + (g[:, None] - 8) ** 2) / 12.0) for i in range(t)]
    return (torch.stack(frames)[None, None].expand(1, 3, t, size, size) * 1.6 - 0.8).contiguous()


def test_tiny_model_learns_a_clip():
    m = _model(size=16, sample_posterior=False)
    x = _moving_blob()
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        loss = (m({"x": x})["recon"] - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]  # 0.58 -> 0.24 in 8 steps (seed 0)


def test_recipes_compose(tmp_path):
    full = compose_cfg(["experiment=stepvideo_vae"], tmp_path)
    assert full.model.latent_channels == 64 and full.model.enc_mult == [4, 8, 16, 16] and full.model.dual_path
    assert full.model.freeze == ["enc_backbone", "enc_mid", "dec_mid", "dec_backbone"]
    assert full.module._target_.endswith("GANModule") and full.objective.terms.adv.discriminator.dims == 3
    assert full.objective.terms.adv.start_step > 0 and full.data.frames == 17
    smoke = compose_cfg(["experiment=stepvideo_vae", "debug=smoke"], tmp_path)
    assert (smoke.data.frames, smoke.data.image_size, smoke.model.dec_channels) == (1, 16, 128)
    clips = compose_cfg(["experiment=stepvideo_vae_clips"], tmp_path)
    assert clips.model.latent_channels == 64 and set(clips.objective.terms) == {"rec", "kl"}


def test_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match=r"data.frames=10: a clip must have 1 \+ 8\*k frames"):
        _model(t=10)
    with pytest.raises(ValueError, match="data.image_size: 24x24 is not divisible by the spatial factor 16"):
        _model(size=24)
    with pytest.raises(ValueError, match="model.chunk_frames=12"):
        _model(chunk_frames=12)
    with pytest.raises(ValueError, match="model.temporal_down"):
        _model(temporal_down=[True])
    with pytest.raises(ValueError, match="unknown module name 'encoder'.*enc_backbone"):
        _model(freeze=["encoder"])
    with pytest.raises(ValueError, match=r"a clip of 5 frames: the model needs 1 \+ 8\*k frames"):
        _model().latents({"x": _clip(t=5)})


@pytest.mark.benchmark
@needs_data("videos", "videos_64px.npz")
def test_proof_stepvideo_vae():
    result = load_script("proof_stepvideo_vae").main(["--quick"])
    json.dumps(result)
    # CF from the real latent shapes: 3*9*32*32 / (64 * 2*2*2)
    assert result["stepvideo_vae"]["cf"] == 54 and result["conv_paths_zeroed"]["cf"] == 54
    assert {"frame_repeat", "image_ae", "long_clip_memory"} <= set(result)
