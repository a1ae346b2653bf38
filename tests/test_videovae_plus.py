"""VideoVAE+ (card 3): 4x8x8 shapes from two stacked posteriors, 2-D -> 3-D inflation reproducing the 2-D VAE,
images skipping every temporal layer, text conditioning through a frozen encoder, the learned-log-variance loss."""

from __future__ import annotations

import math

import pytest
import torch

from aeforge.models.videovae_plus import VideoVAEPlus, inflate_from_2d, inflate_weight
from aeforge.objectives.videovae_plus import LogVarNLL, PosteriorKL
from aeforge.targets.text_encoder import FrozenTextEncoder

TINY = dict(channels=16, channel_mult=[1, 2], num_res_blocks=1, z_channels=4, head_dim=16,
            temporal_channels=[16, 16, 16])
CAPS = ["a cat walks left", "a car drives right"]


def tiny(shape=(3, 4, 8, 8), **kw) -> VideoVAEPlus:
    torch.manual_seed(0)
    return VideoVAEPlus(shape, **{**TINY, **kw}).eval()


def make_2d_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                         latent_channels=4, norm_num_groups=32).eval()


def test_inflated_model_reproduces_the_2d_vae_on_images_and_static_clips():
    ae = make_2d_vae()
    model = VideoVAEPlus((3, 4, 8, 8), **{**TINY, "channels": 32}, temporal_compressor=False,
                         text_encoder="random:16x1", text_max_length=16).eval()
    report = inflate_from_2d(model, ae.state_dict())
    assert any(".tconv1." in k for k in report["kept_init"]) and "decoder.conv_out.weight" in report["loaded"]
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        ref_mu = ae.encode(x).latent_dist.mean
        ref = ae.decode(ref_mu).sample
        image = model.reconstruct({"x": x[:, :, None], "caption": CAPS})[:, :, 0]
        static = {"x": x[:, :, None].expand(2, 3, 4, 8, 8).contiguous(), "caption": CAPS}
        rec = model.reconstruct(static)
        mu = model.latents(static)["z"]
    assert (image - ref).abs().max() < 1e-4
    assert (rec - ref[:, :, None]).abs().max() < 1e-4  # temporal convs, temporal attention, text: identity at init
    assert (mu - ref_mu[:, :, None]).abs().max() < 1e-5  # joint 3-D attention over copies = per-frame attention
    assert inflate_weight(torch.ones(2, 2, 3, 3), 3)[:, :, 1].eq(1).all()


def test_inflation_names_the_tensor_that_does_not_fit():
    state = make_2d_vae().state_dict()
    with pytest.raises(ValueError, match="decoder.conv_out.weight"):
        inflate_from_2d(tiny(), {"decoder.conv_out.weight": state["decoder.conv_out.weight"]})
    with pytest.raises(KeyError, match="no place"):
        inflate_from_2d(tiny(), {"encoder.bogus.weight": torch.zeros(1)})


def test_two_posteriors_give_4x8x8_and_images_skip_the_compressor():
    model = tiny((3, 8, 16, 16), text_encoder=None, channel_mult=[1, 1, 1, 1])
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.latents({"x": x})["z"]
        zi = model.latents({"x": x, "is_image": torch.ones(2, dtype=torch.bool)})["z"]
    assert tuple(z.shape) == (2, 4, 2, 2, 2)  # T/4, H/8, W/8: CF = 3*8*16*16 / (4*2*2*2) = 192
    assert math.prod(x.shape[1:]) / math.prod(z.shape[1:]) == 192
    assert tuple(zi.shape) == (2, 4, 8, 2, 2)  # images: the spatial posterior, frames kept
    model.train()
    out = model({"x": x})
    assert out["recon"].shape == x.shape and out["mu"].shape == out["logvar"].shape == z.shape
    with pytest.raises(ValueError, match="is_image"):
        model({"x": x, "is_image": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="multiple of the temporal factor"):
        model({"x": x[:, :, :6]})


def test_temporal_layers_mix_frames_of_videos_only():
    model = tiny(text_encoder=None, temporal_compressor=False)
    for name, p in model.named_parameters():  # wake the zero-initialised temporal branches
        if ".tconv" in name or "temporal_attentions" in name:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    y = x.clone()
    y[:, :, 3] = -x[:, :, 3]  # change the last frame only
    with torch.no_grad():
        for is_image, mixes in ((False, True), (True, False)):
            flag = torch.tensor([is_image])
            a = model.reconstruct({"x": x, "is_image": flag})[:, :, 0]
            b = model.reconstruct({"x": y, "is_image": flag})[:, :, 0]
            assert bool((a - b).abs().max() > 1e-4) == mixes, f"is_image={is_image}"


def test_text_conditions_the_reconstruction():
    model = tiny(text_encoder="random:16x1", text_max_length=24)
    for name, p in model.named_parameters():  # the cross-attention starts as the identity; open it
        if "cross_attentions" in name or "xattn" in name:
            torch.nn.init.normal_(p, std=0.05)
    x = (torch.rand(1, 3, 4, 8, 8) * 2 - 1).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        rec = model.reconstruct({"x": x, "caption": CAPS})
    assert (rec[0] - rec[1]).abs().max() > 1e-4
    with pytest.raises(KeyError, match="caption"):
        model.reconstruct({"x": x})
    assert not any(k.startswith("text.") for k in model.state_dict())  # rebuilt from its source, not saved
    assert all(not p.requires_grad for p in model.text.parameters())
    model.train()
    assert not model.text.training


def test_random_text_encoder_is_fixed_and_hf_sources_load(tmp_path):
    a, b = FrozenTextEncoder("random:16x1", 24), FrozenTextEncoder("random:16x1", 24)
    fa, ma = a(CAPS)
    assert torch.equal(fa, b(CAPS)[0]) and fa.shape[-1] == a.dim == 16 and ma.dtype == torch.bool
    assert not torch.equal(fa[0], fa[1])
    from transformers import BertConfig, BertModel, BertTokenizer, T5Config, T5Model

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "walks", "left"]))
    tok = BertTokenizer(str(vocab))
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    tok.save_pretrained(bert)
    t5 = tmp_path / "t5"
    T5Model(T5Config(vocab_size=9, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(t5)
    tok.save_pretrained(t5)
    for path, width in ((bert, 16), (t5, 16)):
        enc = FrozenTextEncoder(f"hf:{path}", 16)
        feats, mask = enc(["a cat walks left"])
        assert feats.shape == (1, int(mask.sum()), width) and enc.dim == width
    assert FrozenTextEncoder(f"hf:{t5}", 16).encoder.__class__.__name__ == "T5Stack"  # the encoder only
    with pytest.raises(ValueError, match="random:<width>x<layers>"):
        FrozenTextEncoder("random:big", 16)
    with pytest.raises(ValueError, match="could not be loaded"):
        FrozenTextEncoder(f"hf:{tmp_path / 'missing'}", 16)


def test_learned_logvar_nll_and_kl_follow_the_card():
    x = torch.zeros(2, 3, 4, 8, 8)
    pred = torch.full_like(x, 0.5)
    nll = LogVarNLL(logvar_init=0.3)
    n = x[0].numel()
    expected = (0.5 * n / math.exp(0.3) + n * 0.3)  # per clip: sum r / exp(s) + s over its pixels
    assert torch.isclose(nll({"recon": pred}, {"x": x}), torch.tensor(expected))
    # the log-variance moves toward log(mean |r|) = log 0.5
    opt = torch.optim.SGD(nll.parameters(), lr=1e-4)
    for _ in range(200):
        opt.zero_grad()
        nll({"recon": pred}, {"x": x}).backward()
        opt.step()
    assert abs(nll.logvar.item() - math.log(0.5)) < 0.05

    class HalfLPIPS(torch.nn.Module):
        def forward(self, outputs, batch):
            return torch.tensor(0.25)

    with_p = LogVarNLL(perceptual=HalfLPIPS(), perceptual_weight=2.0)
    assert torch.isclose(with_p({"recon": pred}, {"x": x}), torch.tensor(n * (0.5 + 2 * 0.25)))
    mu, logvar = torch.ones(2, 4, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2)
    assert torch.isclose(PosteriorKL()({"mu": mu, "logvar": logvar}, {}), torch.tensor(0.5 * 16))


def test_a_few_steps_reduce_the_loss():
    model = tiny(text_encoder="random:16x1", text_max_length=24).train()
    nll, kl = LogVarNLL(), PosteriorKL()
    batch = {"x": torch.rand(2, 3, 4, 8, 8) * 2 - 1, "caption": CAPS}
    opt = torch.optim.Adam([*model.parameters(), *nll.parameters()], lr=2e-3)
    losses = []
    for _ in range(4):
        out = model(batch)
        loss = nll(out, batch) + 1e-6 * kl(out, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.text.encoder.embeddings.word_embeddings.weight.grad is None  # frozen


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="mid_attention"):
        tiny(mid_attention="4d")
    with pytest.raises(ValueError, match="text_levels"):
        tiny(text_levels=[5])
    with pytest.raises(ValueError, match="data.frames"):
        tiny(shape=(3, 6, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny(shape=(3, 4, 7, 7))
