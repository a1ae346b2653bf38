"""MAR (card 9): the card's unit tests — mask ratio within [min, 1], ⌈L·ρ⌉ tokens masked, buffers never dropped,
each token replicated diffusion_batch_mul times with its mask — plus the learned-variance bound, the sampler
contract and a config error, at tiny width."""

from __future__ import annotations

import math

import pytest
import torch

from aeforge.models.mar import MAR, mask_by_order, random_orders, truncated_normal_ratio
from aeforge.objectives.flow import EpsilonLoss
from aeforge.objectives.mar import LearnedVarianceVLB

TINY = dict(patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, buffer_size=2, diffloss_depth=1, diffloss_width=16, diffusion_batch_mul=3,
            sample_diffusion_steps=4, timesteps=50)


def tiny(**kw) -> MAR:
    torch.manual_seed(0)
    return MAR((1, 8, 8), 3, **{**TINY, **kw})


def test_mask_ratio_truncated_and_count():
    g = torch.Generator().manual_seed(0)
    ratios = [truncated_normal_ratio(1.0, 0.25, 0.7, 1.0, g) for _ in range(2000)]
    assert min(ratios) >= 0.7 and max(ratios) <= 1.0
    assert sum(r > 0.95 for r in ratios) > 300  # mass near 1 (fully masked inputs occur)
    m = tiny()
    for _ in range(20):
        orders, mask, ratio = m.sample_mask(5, "cpu", g)
        assert (mask.sum(1) == math.ceil(m.seq_len * ratio)).all()
        assert torch.equal(mask, mask_by_order(orders, int(mask[0].sum())))


def test_buffers_never_dropped_and_fully_masked_input():
    m = tiny().eval()
    tokens = torch.randn(2, m.seq_len, m.token_dim)
    cond = m.condition(torch.tensor([0, 1]), 2, "cpu")
    full = torch.ones(2, m.seq_len)
    enc = m.forward_encoder(tokens, full, cond)
    assert enc.shape == (2, m.buffer_size, 16)  # ρ = 1: the encoder keeps only the buffers
    half = mask_by_order(random_orders(2, m.seq_len, "cpu"), m.seq_len // 2)
    assert m.forward_encoder(tokens, half, cond).shape[1] == m.buffer_size + m.seq_len - m.seq_len // 2
    assert m.forward_decoder(enc, full).shape == (2, m.seq_len, 16)


def test_replication_and_losses():
    m = tiny()
    batch = {"x": torch.rand(4, 1, 8, 8) * 2 - 1, "y": torch.tensor([0, 1, 2, 0])}
    out = m(batch)
    n = 4 * m.seq_len
    assert out["x0"].shape == (3 * n, m.token_dim) and out["mask"].shape == (3 * n,)
    assert torch.equal(out["x0"][:n], out["x0"][n:2 * n]) and torch.equal(out["mask"][:n], out["mask"][2 * n:])
    assert not torch.equal(out["t"][:n], out["t"][n:2 * n])  # independent (t, ε) per copy
    # the weighted mean equals Σ m·mse / Σ m over masked tokens
    eps_loss = EpsilonLoss(key_weight="loss_weight")(out, batch)
    per = (out["eps_pred"] - out["eps"]).pow(2).mean(1)
    assert torch.allclose(eps_loss, (per * out["mask"]).sum() / out["mask"].sum(), atol=1e-6)
    vlb = LearnedVarianceVLB(schedule="cosine", timesteps=50)(out, batch)
    assert torch.isfinite(vlb)
    (eps_loss + vlb).backward()
    assert m.diffloss.out.weight.grad.abs().sum() > 0
    # stop-gradient on the mean: the VLB alone moves no ε output (only the variance half)
    m.zero_grad()
    LearnedVarianceVLB(schedule="cosine", timesteps=50)(m(batch), batch).backward()
    g = m.diffloss.out.weight.grad
    assert g[: m.token_dim].abs().sum() == 0 and g[m.token_dim:].abs().sum() > 0


def test_vlb_is_exact_kl_when_variance_is_true():
    """With the true ε and the posterior variance (v = -1), the t > 0 bound is 0: q and p coincide."""
    s = LearnedVarianceVLB(schedule="cosine", timesteps=50)
    x0, eps = torch.randn(8, 4), torch.randn(8, 4)
    t = torch.arange(1, 9)
    x_t = s.schedule.q_sample(x0, t, eps)
    out = {"x0": x0, "x_t": x_t, "t": t, "eps_pred": eps, "var_values": -torch.ones(8, 4)}
    assert LearnedVarianceVLB(schedule="cosine", timesteps=50, key_weight=None)(out, {}).abs() < 1e-6


def test_sample_contract_and_probe_features():
    m = tiny().eval()
    g = torch.Generator().manual_seed(0)
    imgs = m.sample(3, torch.tensor([0, 1, 2]), guidance=2.0, steps=4, generator=g)
    assert imgs.shape == (3, 1, 8, 8) and imgs.min() >= -1 and imgs.max() <= 1
    again = m.sample(3, torch.tensor([0, 1, 2]), guidance=2.0, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(imgs, again)  # seeded
    assert m.sample(2, None, steps=3).shape == (2, 1, 8, 8)  # unconditional
    assert m.encode({"x": torch.zeros(2, 1, 8, 8)}).shape == (2, 16)
    assert "diffloss.out.weight" in m.no_weight_decay()


def test_bad_config_errors():
    with pytest.raises(ValueError, match="patch_size"):
        MAR((1, 8, 8), 3, **{**TINY, "patch_size": 3})
    with pytest.raises(ValueError, match="buffer_size"):
        MAR((1, 8, 8), 3, **{**TINY, "buffer_size": 0})
    with pytest.raises(ValueError, match="noise schedule"):
        MAR((1, 8, 8), 3, **{**TINY, "noise_schedule": "cubic"})
    with pytest.raises(KeyError, match="learn_sigma"):
        m = tiny(learn_sigma=False)
        LearnedVarianceVLB(timesteps=50)(m({"x": torch.zeros(2, 1, 8, 8), "y": torch.tensor([0, 1])}), {})


def test_sampler_recovers_gaussian_and_clip_x0_guards_the_top_step():
    """The reverse DDPM with the exact ε of x0 ~ N(0.5, 0.3²) returns that law; with a 1 % ε error the cosine top
    step (1/sqrt(ᾱ) ~ 2e4) throws tokens far out unless clip_x0 clamps the x0 estimate (the cause of the proof's
    saturated noise samples)."""
    m = tiny(timesteps=1000).eval()
    mu, s, err = 0.5, 0.3, [0.0]

    def head(x_t, t, z):
        a = m.schedule.alphas_cumprod[t].float()[:, None]
        eps = (x_t - a.sqrt() * mu) * (1 - a).sqrt() / (a * s**2 + 1 - a)
        return eps * (1 + err[0]), torch.zeros_like(eps)

    m._head = head
    draw = lambda steps=50: m.sample_tokens(torch.zeros(2000, 16), 1.0, steps, 1.0,
                                            torch.Generator().manual_seed(0))
    x = draw()
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.03
    err[0] = 0.01
    assert draw(steps=2).abs().mean() > 10  # the top step alone (t = T-1 -> 0): unclamped, blown up
    m.clip_x0 = 1.0
    assert draw(steps=2).abs().max() <= 1.0 + 1e-3
    x = draw()
    assert abs(float(x.mean()) - mu) < 0.03 and abs(float(x.std()) - s) < 0.05
    with pytest.raises(ValueError, match="clip_x0"):
        MAR((1, 8, 8), 3, **{**TINY, "clip_x0": 0.0})
