"""Hi-VAE (card 1): the frozen image VAE wrapper, the frequency filter, the query encoders, the flow decoder, the
model's contract, freezing by name in stage B and stage chaining with ckpt=."""

from __future__ import annotations

import json

import pytest
import torch

from aeforge.eval.video_recon import compression_factor
from aeforge.models.hi_vae import FrameKLVAE, HiVAE
from aeforge.nn.query_transformer import (
    FlowDiTDecoder,
    PerFrameQueryEncoder,
    TemporalQueryEncoder,
    frequency_filter_2d,
    frequency_filter_3d,
)
from aeforge.targets.image_vae import FrozenImageVAE, build_autoencoder_kl
from tests.conftest import compose_cfg, needs_data

TINY_VAE = dict(image_vae_channels=[8, 16], image_vae_layers_per_block=1)  # ÷2: 16 px frames -> 4x8x8
TINY = dict(global_queries=2, global_channels=4, global_embed_dim=32, global_num_heads=2, global_depth=1,
            global_patch_size=1, detail_tokens=2, detail_channels=4, detail_embed_dim=32, detail_num_heads=2,
            detail_depth=1, decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=1, time_dim=32, sample_steps=2)


def tiny(stage="global", frames=5, **kw):
    return HiVAE((3, frames, 16, 16), stage=stage, **{**TINY_VAE, **TINY, **kw})


def clip(b=2, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(b, 3, t, 16, 16, generator=g) * 2 - 1}


def test_image_vae_from_a_diffusers_folder_is_frozen(tmp_path):
    vae = build_autoencoder_kl([8, 16], 4, 1, 4)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    frozen = FrozenImageVAE(f"diffusers:{tmp_path / 'vae'}")
    assert frozen.scaling_factor == 0.5 and frozen.downsample == 2 and frozen.latent_channels == 4
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = frozen.encode(x)
    assert z.shape == (3, 4, 8, 8) and not z.requires_grad
    torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * 0.5)
    assert frozen.decode(z).shape == x.shape
    frozen.train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match=r"image_vae.source='sd' is not one of \['diffusers:<folder>'"):
        FrozenImageVAE("sd")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FrozenImageVAE(f"diffusers:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="not divisible by the image VAE's downsampling factor 2"):
        frozen.encode(torch.zeros(1, 3, 15, 16))


def test_frequency_filter_splits_the_signal():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 8, 8)
    low, high = frequency_filter_3d(x, 0.6, 0.6, "low"), frequency_filter_3d(x, 0.6, 0.6, "high")
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)  # P and 1 - P
    const = torch.full((1, 1, 4, 8, 8), 3.0)
    torch.testing.assert_close(frequency_filter_3d(const, 0.6, 0.6, "low"), const, atol=1e-5, rtol=0)  # DC passes
    assert frequency_filter_2d(const, 0.5, "high").abs().max() < 1e-5  # and leaves the high-pass
    assert low.std() < x.std() and high.std() < x.std()
    with pytest.raises(ValueError, match="low or high"):
        frequency_filter_3d(x, 0.6, 0.6, "band")


def test_query_encoders_shapes_and_masking():
    z = torch.randn(2, 4, 4, 8, 8)
    enc = TemporalQueryEncoder(4, (8, 8), 4, 2, 32, 2, 1, num_queries=2, out_channels=3)
    assert enc(z).shape == (2, 4, 16, 3)  # per frame, per location
    enc_q = TemporalQueryEncoder(4, (8, 8), 4, 2, 32, 2, 1, num_queries=2, out_channels=3, output="queries")
    assert enc_q(z).shape == (2, 2, 16, 3)  # the paper's f_g steps
    masked = TemporalQueryEncoder(4, (8, 8), 4, 2, 32, 2, 1, 2, 3, mask_ratio=0.9).train()
    assert masked(z).shape[2] < 16 and masked.eval()(z).shape[2] == 16  # masking only while training
    per_frame = PerFrameQueryEncoder(4, (8, 8), 2, 32, 2, 1, num_queries=3, out_channels=5)
    assert per_frame(z).shape == (2, 4, 3, 5)


def test_decoder_starts_at_zero_velocity_and_learns():
    torch.manual_seed(0)
    dec = FlowDiTDecoder(4, (8, 8), 3, 2, 32, 2, 1, 32, global_channels=3, detail_channels=None)
    z_t, z_ref, t, u_g = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 4, 3)
    assert dec(z_t, z_ref, t, u_g).abs().max() == 0  # adaLN-zero and a zero head
    with pytest.raises(ValueError, match="u_g is required"):
        dec(z_t, z_ref, t)
    target = z_ref[:, None].expand_as(z_t)  # a velocity it can read off its condition
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (dec(z_t, z_ref, t, u_g) - target).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_contract_latents_and_compression_factor():
    torch.manual_seed(0)
    batch = clip()
    # z_ref 4x8x8; u_g: 4 frames x 4 positions (÷4 down-sampler, patch 1) x 4; u_d: 4 frames x 2 tokens x 4
    for stage, values in (("global", 4 * 8 * 8 + 4 * 4 * 4), ("detailed", 4 * 8 * 8 + 4 * 4 * 4 + 4 * 2 * 4)):
        model = tiny(stage).eval()
        with torch.no_grad():  # off the zero-velocity start, so that the motion latents matter
            for p in model.decoder.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out = model.train()(batch)
        assert out["v_pred"].shape == out["v_target"].shape == (2, 4, 4, 8, 8)
        lat = model.eval().latents(batch)
        assert sorted(lat) == (["u_d", "u_g", "z_ref"] if stage == "detailed" else ["u_g", "z_ref"])
        assert sum(v[0].numel() for v in lat.values()) == values
        assert compression_factor((3, 5, 16, 16), lat) == 3 * 5 * 16 * 16 / values
        recon = model.reconstruct(batch)
        assert recon.shape == batch["x"].shape
        torch.testing.assert_close(recon, model.decode_latents(lat))  # fixed noise: deterministic
        # motion transfer is a decode of mixed latents: global motion of clip A, reference of clip B
        other = model.latents(clip(seed=1))
        mixed = model.decode_latents({**other, "u_g": lat["u_g"]})
        assert mixed.shape == recon.shape and not torch.equal(mixed, model.decode_latents(other))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"model.stage='both'; valid: \['global', 'detailed'\]"):
        tiny("both")
    with pytest.raises(ValueError, match="model.decoder_patch_size=3 does not tile its 8x8 latent grid"):
        tiny(decoder_patch_size=3)
    with pytest.raises(ValueError, match=r"unknown module name 'detail_encoder' in HiVAE; valid names: \[image_vae"):
        tiny("global", freeze=["detail_encoder"])
    with pytest.raises(ValueError, match="model.detail_filter='low'"):
        tiny("detailed", detail_filter="low")


def test_stage_b_keeps_the_frozen_global_encoder_bit_identical():
    torch.manual_seed(0)
    model = tiny("detailed", freeze=["global_encoder"]).train()
    before = {k: v.clone() for k, v in model.global_encoder.state_dict().items()}
    dec = model.decoder.out.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(2):
        loss = (lambda o: (o["v_pred"] - o["v_target"]).pow(2).mean())(model(clip(seed=step)))
        opt.zero_grad(), loss.backward(), opt.step()
        model.on_train_step_end(step + 1, 2)
    assert all(torch.equal(v, before[k]) for k, v in model.global_encoder.state_dict().items())
    assert not torch.equal(model.decoder.out.weight, dec)


def test_frame_kl_vae_outputs_and_latent_std():
    model = FrameKLVAE((3, 2, 16, 16), block_out_channels=[8, 16], norm_num_groups=4, std_momentum=1.0).train()
    out = model(clip(t=2))
    assert out["recon"].shape == (2, 3, 2, 16, 16) and out["mu"].shape == (4, 4 * 8 * 8)
    assert model.latent_std.item() != 1.0  # measured from the batch
    assert model.latents(clip(t=2))["z"].shape == (2, 2, 4, 8, 8)


@needs_data("videos", "videos_64px.npz")
def test_stage_chaining_loads_stage_a_and_freezes_by_name(tmp_path):
    from aeforge.train import run

    common = ["experiment=hi_vae_clips", "debug=smoke", "evaluate=false", "trainer.max_steps=2",
              "trainer.limit_val_batches=0", "data.batch_size=2", "data.frames=5", "data.image_size=32",
              "model.image_vae_channels=[8,16,16,16]", "model.global_queries=2"]
    run(compose_cfg(common, tmp_path / "a"))
    ckpt_a = tmp_path / "a" / "checkpoints" / "last.ckpt"
    run(compose_cfg([*common, "stage=detailed", "model.freeze=[global_encoder]", f"ckpt={ckpt_a}"], tmp_path / "b"))
    a = torch.load(ckpt_a, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    enc = [k for k in a if k.startswith("model.global_encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)  # loaded from stage A, then frozen through training
    assert any(k.startswith("model.detail_encoder.") for k in b) and not any("detail" in k for k in a)
    assert not torch.equal(a["model.decoder.out.weight"], b["model.decoder.out.weight"])  # the decoder trained on
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["steps"] == 2
