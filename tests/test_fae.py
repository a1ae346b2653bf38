"""FAE (card 6) at tiny width: the frozen encoder gets no gradient, stays bit-identical and stays out of the
checkpoint; the Gaussian token bottleneck's shapes and KL; each stage's optimiser step changes only that stage's
parts; the feature VAE learns; 2-D RoPE is relative; the paper's parameter counts at full width (meta device);
stage-gated loss terms, config errors, and the recipe's `stage` reaching model and objective."""

from __future__ import annotations

import pytest
import torch

from aeforge.models.fae import FAE, FeatureDecoder, PixelDecoder, SingleAttentionEncoder
from aeforge.nn.dit import apply_rope, rope_2d
from aeforge.objectives.fae import FeatureMSE, StageTerm, TokenKL
from aeforge.objectives.reconstruction import PixelL1

# a random aeforge ViT stands in for the frozen encoder (no hub look-up): 8 px, patch 4 -> 2x2 tokens x 16
ENC = dict(encoder_source="aeforge:/nonexistent/last.ckpt", encoder_missing_weights="random",
           encoder_kwargs={"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2})
TINY = dict(**ENC, attn_heads=2, attn_head_dim=8, latent_dim=4, decoder_dim=16, decoder_depth=1,
            decoder_heads=2, pixel_dim=16, pixel_depth=1, pixel_heads=2)
PARTS = ("encoder", "feature_decoder", "pixel_decoder")


def tiny(**kw) -> FAE:
    torch.manual_seed(0)
    return FAE((3, 8, 8), **{**TINY, **kw})


def loss_of(stage: str, out: dict, batch: dict) -> torch.Tensor:
    if stage == "feature_vae":
        return FeatureMSE()(out, batch) + 1e-4 * TokenKL()(out, batch)
    return PixelL1()(out, batch)


def snapshot(m: FAE) -> dict:
    return {k: v.clone() for k, v in m.state_dict(keep_vars=False).items()} | {
        "frozen": {k: v.clone() for k, v in m.frozen_encoder.state_dict().items()}}


@pytest.mark.parametrize("stage", ["feature_vae", "pixel_decoder", "pixel_finetune"])
def test_stage_step_changes_only_its_parts_and_frozen_encoder_is_untouched(stage):
    m = tiny(stage=stage)
    before = snapshot(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    batch = {"x": torch.rand(4, 3, 8, 8) * 2 - 1}
    m.train()
    for _ in range(2):
        loss = loss_of(stage, m(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trains = ("encoder", "feature_decoder") if stage == "feature_vae" else ("pixel_decoder",)
    for part in PARTS:
        changed = any(not torch.equal(before[k], v) for k, v in m.state_dict().items() if k.startswith(part + "."))
        assert changed == (part in trains), (stage, part)
    # the frozen encoder: eval mode, no gradient, bit-identical
    assert not m.frozen_encoder.training
    assert all(p.grad is None and not p.requires_grad for p in m.frozen_encoder.parameters())
    assert all(torch.equal(before["frozen"][k], v) for k, v in m.frozen_encoder.state_dict().items())
    if stage == "feature_vae":  # ... and out of the checkpoint: a strict load works without it
        state = m.state_dict()
        assert not any(k.startswith("frozen_encoder.") for k in state) and "encoder.qkv.weight" in state
        fresh = tiny()
        assert fresh.load_state_dict(state, strict=True).missing_keys == []
        assert torch.equal(fresh.encoder.qkv.weight, m.encoder.qkv.weight)


def test_bottleneck_shapes_kl_and_noise():
    m = tiny().eval()
    x = {"x": torch.rand(2, 3, 8, 8) * 2 - 1}
    out = m(x)
    assert out["feat_pred"].shape == out["feat"].shape == (2, 4, 16)  # 2x2 tokens x 16 features
    assert out["mu"].shape == out["logvar"].shape == (2, 4, 4) and torch.equal(out["z"], out["mu"])  # eval: z = μ
    assert m.train()(x)["z"].shape == (2, 4, 4) and not torch.equal(m(x)["z"], m(x)["mu"])  # training: sampled
    assert m.encode(x).shape == (2, 4) and m.latents(x).shape == (2, 4, 4)
    assert m.reconstruct(x).shape == (2, 3, 8, 8)
    # KL(N(μ, σ²) ‖ N(0, 1)) summed over channels: 0 at the prior, 0.5·μ² per channel otherwise
    zeros = torch.zeros(2, 4, 4)
    assert TokenKL()({"mu": zeros, "logvar": zeros}, {}) == 0
    assert torch.isclose(TokenKL()({"mu": zeros + 1, "logvar": zeros}, {}), torch.tensor(2.0))
    # stage Ib's input noise: σ absolute or relative to the feature RMS
    f = torch.ones(1000, 16) * 3
    assert abs((m.noisy(f) - f).std().item() - 0.4) < 0.05
    assert abs((tiny(pixel_noise_relative=True).noisy(f) - f).std().item() - 1.2) < 0.1


def test_feature_vae_learns_and_linear_ablation_builds():
    batch = {"x": torch.rand(16, 3, 8, 8) * 2 - 1}
    m = tiny()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = FeatureMSE()(m(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    lin = tiny(encoder_type="linear")
    assert [type(c).__name__ for c in lin.encoder.children()] == ["Linear"] and lin(batch)["mu"].shape == (16, 4, 4)


def test_rope_is_relative():
    cos, sin = rope_2d((3, 3), 8)
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda v, i: apply_rope(v.view(1, 1, 1, 8).expand(1, 1, 9, 8), cos, sin)[0, 0, i]
    # positions (0,0)-(1,1) and (1,1)-(2,2): the same offset, the same score; the norm is kept
    assert torch.allclose(rot(q, 0) @ rot(k, 4), rot(q, 4) @ rot(k, 8), atol=1e-5)
    assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d((2, 2), 6)


def test_full_size_parameter_counts():
    """The paper's App. D sizes: encoder 38.2M, feature decoder 170M, pixel decoder 305M (meta device)."""
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    with torch.device("meta"):
        enc = SingleAttentionEncoder(1536, 24, 256, 64)
        fdec = FeatureDecoder(32, 1536, (16, 16), 1536, 6, 24, 4.0, 1e4)
        pdec = PixelDecoder(1536, (16, 16), (3, 256, 256), 1024, 24, 16, 4.0)
    assert 37 < count(enc) < 39 and 168 < count(fdec) < 174 and 300 < count(pdec) < 310


def test_stage_terms_errors_and_recipe_stage():
    from aeforge.compose import compose_config

    out = {"recon": torch.ones(2, 3, 8, 8), "feat": torch.zeros(2, 4, 16), "feat_pred": torch.ones(2, 4, 16)}
    batch = {"x": torch.zeros(2, 3, 8, 8)}
    assert StageTerm(PixelL1(), ["pixel_decoder"], "pixel_decoder")(out, batch) == 1
    assert StageTerm(PixelL1(), ["pixel_decoder"], "feature_vae")(out, batch) == 0
    assert StageTerm(FeatureMSE(), ["feature_vae"], "feature_vae")(out, batch) == 1
    with pytest.raises(ValueError, match="stage 'pixels'"):
        StageTerm(PixelL1(), ["pixels"], "feature_vae")
    with pytest.raises(ValueError, match="stage='global'"):
        tiny(stage="global")
    with pytest.raises(ValueError, match="encoder_type"):
        tiny(encoder_type="mlp")
    with pytest.raises(ValueError, match="multiple of the grid"):
        FAE((3, 12, 8), **TINY)
    cfg = compose_config(["experiment=fae_cifar10", "stage=pixel_decoder", "debug=smoke"])
    assert cfg.model.stage == "pixel_decoder" and cfg.objective.terms.l1.stage == "pixel_decoder"
