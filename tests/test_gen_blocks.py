"""Shared generative blocks: the adaptive GAN weight against its formula, hinge losses, PatchGAN shapes, the GAN's
delayed start (terms 0, discriminator optimiser still) and exact resume of the two-optimizer GANModule under
Lightning, LPIPS (0 on identical inputs, per frame on video, backbone weights from a path), the flow time
shift on the sampler grid, exact Euler/Heun on a straight flow, CFG/AutoGuidance, DDPM tables and DDIM
encode→decode at η = 0 with the analytic ε of Gaussian data."""

from __future__ import annotations

import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from aeforge.data.images import SyntheticImageDataModule
from aeforge.models.base import AutoencoderModel
from aeforge.modules.base import AEModule
from aeforge.modules.gan import GANModule
from aeforge.modules.optim import OptimSettings
from aeforge.nn import flow
from aeforge.nn.diffusion import NoiseSchedule
from aeforge.nn.gan import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from aeforge.objectives import Objective
from aeforge.objectives.adversarial import AdversarialLoss
from aeforge.objectives.flow import EpsilonLoss, VelocityLoss
from aeforge.objectives.perceptual import LPIPSLoss, build_lpips, lpips_distance
from aeforge.objectives.reconstruction import PixelMSE


# -- GAN blocks ---------------------------------------------------------------------------------------
def test_adaptive_weight_equals_formula_on_a_toy():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 5))
    z, x = torch.randn(8, 5), torch.randn(8, 3)
    d = nn.Linear(3, 1)
    recon = z @ w.t()
    rec, g = (recon - x).abs().mean(), hinge_g_loss(d(recon))
    lam = adaptive_weight(rec, g, w)
    # by hand: rec = mean|zwᵀ − x| → ∇_w = sign(zwᵀ − x)ᵀ z / (8·3); g = −mean d(zwᵀ) → ∇_w = −1ᵀ… = −a zᵀ1/8
    grad_rec = torch.sign(recon - x).t() @ z / recon.numel()
    grad_g = -(d.weight.t() @ torch.ones(1, 8)) @ z / 8
    assert torch.allclose(lam, grad_rec.norm() / (grad_g.norm() + 1e-4), rtol=1e-5)
    assert not lam.requires_grad
    # the graphs survive for the backward pass, and the clamp holds
    (rec + lam * g).backward()
    assert w.grad is not None
    tiny = adaptive_weight((z @ w.t()).sum() * 1e9, hinge_g_loss(d(z @ w.t())), w, max_weight=7.0)
    assert tiny.item() == 7.0


def test_hinge_losses_and_patch_discriminator_shapes():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)))
    assert torch.isclose(hinge_g_loss(fake), torch.tensor(1 / 3))
    d2, d3 = PatchDiscriminator(3, 8, 2, dims=2), PatchDiscriminator(3, 8, 3, dims=3)
    assert d2(torch.randn(2, 3, 16, 16)).shape == (2, 1, 2, 2)
    assert d2(torch.randn(2, 3, 4, 16, 16)).shape == (8, 1, 2, 2)  # per frame
    assert d3(torch.randn(2, 3, 8, 16, 16)).shape == (2, 1, 2, 2, 2)
    assert d3(torch.randn(2, 3, 1, 16, 16)).shape[2] == 1  # a 1-frame "video" (joint image-video batches)
    with pytest.raises(ValueError, match="needs H, W >= 24"):
        PatchDiscriminator(3, 8, 3, dims=2)(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"dims=4.*valid: \[2, 3\]"):
        PatchDiscriminator(dims=4)
    with pytest.raises(ValueError, match=r"loss='wgan'.*valid"):
        AdversarialLoss(PatchDiscriminator(), loss="wgan")


# -- GANModule under Lightning ------------------------------------------------------------------------
class TinyAE(AutoencoderModel):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 4, 4)
        self.dec = nn.ConvTranspose2d(4, 3, 4, 4)

    def forward(self, batch):
        z = self.enc(batch["x"])
        return {"z": z, "recon": self.dec(z)}

    def encode(self, batch):
        return self.enc(batch["x"]).flatten(1)

    def last_layer_weight(self):
        return self.dec.weight


def _datamodule():
    return SyntheticImageDataModule(num_train=8, num_val=4, num_classes=2, channels=3, image_size=16,
                                    batch_size=4, num_workers=0, mean=[0.5], std=[0.5])


def _gan_module(start_step: int, seed: int = 0, module=GANModule) -> pl.LightningModule:
    torch.manual_seed(seed)
    adv = AdversarialLoss(PatchDiscriminator(3, 8, 2), weight=0.5, start_step=start_step)
    objective = Objective({"recon": PixelMSE(), "adv": adv})
    optim = OptimSettings(optimizer="adam", lr=1e-2, betas=[0.5, 0.9], schedule="constant")
    return module(model=TinyAE(), objective=objective, optim=optim)


class Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def _trainer(tmp_path, steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1, log_every_n_steps=1, callbacks=list(callbacks), default_root_dir=tmp_path)


def _disc(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.objective.terms["adv"].discriminator.state_dict().items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """3 steps with the GAN from step 1, logged per batch."""
    module, logged = _gan_module(start_step=1), Logged()
    before = _disc(module)
    _trainer(tmp_path_factory.mktemp("gan"), 3, [logged]).fit(module, datamodule=_datamodule())
    return module, logged.rows, before


def test_gan_terms_zero_before_start_and_discriminator_still(tmp_path, straight):
    module, logged = _gan_module(start_step=3), Logged()
    before = _disc(module)
    _trainer(tmp_path, 2, [logged]).fit(module, datamodule=_datamodule())
    assert module.global_step == 2  # one step per batch: the discriminator's step is not counted
    assert all(r["train/adv"] == 0 and r["train/adv_weight"] == 0 for r in logged.rows)
    assert all(torch.equal(before[k], v) for k, v in _disc(module).items())  # BN statistics too
    assert not module.optimizers()[1].optimizer.state  # Adam never stepped
    # from the start step on: the adaptive weight is live and the discriminator moves
    module2, rows, before2 = straight
    assert rows[0]["train/adv"] == 0 and rows[1]["train/adv_weight"] > 0 and rows[2]["train/adv_weight"] > 0
    assert "train/adv_d_loss" in rows[1] and module2.optimizers()[1].optimizer.state
    assert any(not torch.equal(before2[k], v) for k, v in _disc(module2).items())


def test_gan_module_checkpoints_and_resumes_exactly(tmp_path, straight):
    straight = straight[0]
    cut = _gan_module(start_step=1)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(cut, datamodule=_datamodule())
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    ckpt = torch.load(tmp_path / "cut.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["global_step"] == 2
    resumed = _gan_module(start_step=1, seed=1)  # other initial weights: everything comes from the checkpoint
    _trainer(tmp_path, 3).fit(resumed, datamodule=_datamodule(), ckpt_path=str(tmp_path / "cut.ckpt"),
                              weights_only=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for opt_a, opt_b in zip(straight.optimizers(), resumed.optimizers()):
        for sa, sb in zip(opt_a.optimizer.state.values(), opt_b.optimizer.state.values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_adversarial_term_refuses_the_plain_module(tmp_path):
    with pytest.raises(RuntimeError, match="module=gan"):
        _trainer(tmp_path, 1).fit(_gan_module(0, module=AEModule), datamodule=_datamodule())
    optim = OptimSettings(optimizer="adam", lr=1e-3)
    with pytest.raises(ValueError, match="needs an AdversarialLoss term"):
        GANModule(model=TinyAE(), objective=Objective({"recon": PixelMSE()}), optim=optim)


# -- LPIPS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def squeeze():
    return build_lpips("squeeze")  # the small backbone: AlexNet / VGG build 60-140M-parameter classifiers


def test_lpips_zero_on_identical_inputs_and_per_frame_on_video(squeeze):
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 3, 16, 16) * 2 - 1
    assert torch.equal(lpips_distance(a, a, squeeze), torch.zeros(2))
    per_frame = torch.stack([lpips_distance(a[:, :, i], b[:, :, i], squeeze) for i in range(3)], 1).mean(1)
    assert torch.allclose(lpips_distance(a, b, squeeze), per_frame, atol=1e-6)
    assert (lpips_distance(a, b, squeeze) > 0).all()
    gray = lpips_distance(a[:, :1, 0], b[:, :1, 0], squeeze)  # 1 channel → repeated to RGB
    assert gray.shape == (2,)


def test_lpips_loss_warns_on_random_backbone_and_loads_weights(tmp_path, caplog):
    from torchvision.models import squeezenet1_1

    with caplog.at_level(logging.WARNING):
        term = LPIPSLoss(net="squeeze")
    assert "RANDOM backbone" in caplog.text
    assert not any(p.requires_grad for p in term.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert term({"recon": x}, {"x": x}).item() == 0.0
    ref = squeezenet1_1(weights=None)
    torch.save(ref.state_dict(), tmp_path / "squeeze.pth")
    loaded = build_lpips("squeeze", str(tmp_path / "squeeze.pth"))
    assert torch.equal(loaded.net.slice1.get_submodule("0").weight, ref.features[0].weight)
    assert torch.equal(loaded.net.slice7.get_submodule("12").expand3x3.weight, ref.features[12].expand3x3.weight)
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision squeeze state_dict"):
        build_lpips("squeeze", str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match=r"net='resnet'.*valid"):
        build_lpips("resnet")


# -- flow matching ------------------------------------------------------------------------------------
def test_shift_formula_on_the_sampler_grid():
    s = flow.dimension_shift(16 * 16 * 768)
    assert math.isclose(s, math.sqrt(48), rel_tol=1e-12)  # RAE's ≈ 6.93
    grid = flow.time_grid(10, s)
    u = torch.linspace(1, 0, 11, dtype=torch.float64)
    assert torch.allclose(grid.double(), s * u / (1 + (s - 1) * u), atol=1e-6)
    assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    assert torch.equal(flow.time_grid(4, 1.0), torch.linspace(1, 0, 5))
    # training times: the shift maps logit-normal's median 0.5 to s/(1+s), sampled as such
    t = flow.sample_t(20000, "logit_normal", shift=s, generator=torch.Generator().manual_seed(0))
    assert abs(t.median().item() - s / (1 + s)) < 0.01
    with pytest.raises(ValueError, match=r"schedule='beta'.*valid"):
        flow.sample_t(4, "beta")


def test_euler_and_heun_exact_on_a_straight_flow_and_guidance():
    torch.manual_seed(0)
    target, noise = torch.randn(4, 6), torch.randn(4, 6)
    v = lambda x, t: (x - target) / t.view(-1, 1)  # the exact velocity towards a point mass at `target`
    for sampler in (flow.euler_sample, flow.heun_sample):
        assert torch.allclose(sampler(v, noise, 3, shift=2.0)[:, :], target, atol=1e-5)
    xt = flow.interpolate(target, noise, torch.full((4,), 0.25))
    assert torch.allclose(xt, 0.75 * target + 0.25 * noise)
    assert torch.allclose(flow.velocity_target(target, noise), noise - target)
    vc, vu = torch.ones(3), torch.zeros(3)
    assert torch.equal(flow.guided(vc, vu, 1.0), vc) and torch.allclose(flow.guided(vc, vu, 1.5), 1.5 * vc)
    assert flow.guided_velocity(v, None, 1.0) is v
    loss = VelocityLoss()({"v_pred": vc.view(1, 3), "v_target": vu.view(1, 3)}, {})
    assert loss.item() == 1.0


# -- DDPM / DDIM --------------------------------------------------------------------------------------
def test_ddim_encode_then_decode_returns_the_input_at_eta_zero():
    torch.manual_seed(0)
    sched = NoiseSchedule("linear", 1000)
    mu, sig = 0.3, 0.8  # data N(mu, sig²): the optimal ε(x_t, t) is known in closed form

    def eps_fn(x, t):
        a = sched.alpha_bar(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sig**2 + 1 - a)

    x0 = mu + sig * torch.randn(32, 2, 4, 4)
    plain = sched.ddim_sample(eps_fn, sched.ddim_encode(eps_fn, x0, 100), 100)
    assert (plain - x0).pow(2).mean().sqrt() / sig < 0.05  # first-order inversion error of plain DDIM
    exact = sched.ddim_sample(eps_fn, sched.ddim_encode(eps_fn, x0, 20, fixed_point_iters=6), 20)
    assert (exact - x0).abs().max() < 1e-3
    # x_T approaches the probability-flow ODE's analytic endpoint as the grid refines (first order)
    a_T = sched.alphas_cumprod[-1].float()
    ode = a_T.sqrt() * mu + (a_T * sig**2 + 1 - a_T).sqrt() * (x0 - mu) / sig
    errs = [(sched.ddim_encode(eps_fn, x0, n) - ode).abs().max() for n in (50, 200)]
    assert errs[1] < 0.06 and errs[1] < errs[0] / 3
    # forward process and its inverse; ε loss
    t, noise = sched.sample_timesteps(32), torch.randn_like(x0)
    xt = sched.q_sample(x0, t, noise)
    assert torch.allclose(sched.predict_x0(xt, t, noise), x0, atol=1e-4)
    w = torch.arange(32.0)
    assert torch.isclose(EpsilonLoss(key_weight="w")({"eps_pred": noise + 1, "eps": noise, "w": w}, {}), w.mean())
    cos = NoiseSchedule("cosine", 100)
    assert cos.alphas_cumprod[0] > 0.99 and cos.alphas_cumprod[-1] < 1e-3
    with pytest.raises(ValueError, match=r"kind='sigmoid'.*valid"):
        NoiseSchedule("sigmoid")
