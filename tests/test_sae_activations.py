"""SAE activations (aeforge/models/sae_activations.py): each selection rule, AuxK, a training step of every
variant, and the config check that refuses a misspelt activation key."""

from __future__ import annotations

import math

import pytest
import torch

from aeforge.config import ConfigError
from aeforge.models import sae_activations as acts
from aeforge.models.sae import SAEBank, SparseAutoencoder
from aeforge.objectives.sparsity import SAEObjective
from aeforge.train import validate
from tests.conftest import compose_cfg


@pytest.mark.parametrize("sparse_kernel", [True, False])
def test_topk_keeps_exactly_k(sparse_kernel):
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, acts.TopK(k=5, sparse_kernel=sparse_kernel), aux_k=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU removes none of the k
    x = torch.randn(32, 16)
    out = sae(x)
    codes = sae.codes(x)
    assert (out.l0 == 5).all() and ((codes != 0).sum(1) == 5).all()
    pre = sae.pre_acts(x - sae.b_dec)
    assert torch.equal(codes.topk(5).indices.sort(1).values, pre.topk(5).indices.sort(1).values)


def test_auxk_only_touches_dead_latents():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, acts.TopK(k=4), aux_k=8, dead_tokens=100)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.tokens_since_fired[dead] = 1000
    out = sae(torch.randn(128, 16))
    assert out.aux_recon is not None
    aux = SAEObjective(aux_mode="gao").aux_loss(out)  # AuxK alone (residual detached, as Gao et al.)
    aux.backward()
    alive_rows = ~dead
    assert sae.W_enc.grad[alive_rows].abs().sum() == 0 and sae.W_dec.grad[alive_rows].abs().sum() == 0
    assert sae.W_enc.grad[dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0


VARIANTS = {
    "relu": (acts.ReLU(), dict(l1_coef=0.1), {}),
    "batchtopk": (acts.BatchTopK(k=4), {}, {}),
    "jumprelu": (acts.JumpReLU(), dict(l0_coef=0.01), {}),
    "top_afa": (acts.TopAFA(), dict(afa_coef=1 / 32), {}),
    "vsae": (acts.VSAE(k=4, var_flag=True), dict(kl_coef=1.0),
             dict(pre_bias=False, unit_norm_decoder=False, init_dec_norm=0.1)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_train_step(variant):
    torch.manual_seed(0)
    activation, coefs, settings = VARIANTS[variant]
    bank = SAEBank((2, 16), activation, n_latents=48, aux_k=8, dead_tokens=0, **settings)
    obj = SAEObjective(recon="mse", **coefs)
    opt = torch.optim.Adam(bank.parameters(), lr=1e-3)
    x = torch.randn(32, 2, 16)
    for _ in range(3):
        out = obj(bank({"x": x}), {})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert torch.isfinite(out["loss"])
    bank.eval()
    assert bank({"x": x})["recon"].shape == x.shape


def test_gsae_gradient_changes_selection():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, acts.GSAE(k=4, beta=100.0), aux_k=0)
    x = torch.randn(8, 16)
    plain = sae(x).idx.sort(1).values
    g = sae.W_dec.detach()[:8] * 10  # gradients aligned with latents 0..7
    chosen = sae(x, g).idx.sort(1).values
    assert not torch.equal(plain, chosen)


def test_activation_parameters_keep_their_checkpoint_keys():
    """Parameters an activation needs live on the SAE, so keys are `saes.<site>.<name>` as before the
    activations became objects (JumpReLU's thresholds, vSAE's variance head)."""
    jump = SAEBank((1, 8), acts.JumpReLU(), n_latents=16).state_dict()
    vsae = SAEBank((1, 8), acts.VSAE(k=2, var_flag=True), n_latents=16).state_dict()
    topk = SAEBank((1, 8), acts.TopK(k=2), n_latents=16).state_dict()
    base = ["saes.0.W_enc", "saes.0.W_dec", "saes.0.b_enc", "saes.0.b_dec"]
    buffers = ["saes.0.tokens_since_fired", "saes.0.threshold"]
    assert list(topk) == base + buffers
    assert list(jump) == [*base, "saes.0.log_threshold", *buffers]
    assert list(vsae) == [*base, "saes.0.W_sigma", "saes.0.b_sigma", *buffers]


@pytest.mark.parametrize(
    ("experiment", "override", "message"),
    [
        ("sae_topk", "+model.activation.kk=3", r"model\.activation\.kk for .*TopK; valid keys: \['k', 'sparse_ke"),
        ("sae_relu", "+model.activation.k=3", r"model\.activation\.k for .*ReLU; valid keys: \[\]"),
        ("sae_topk", "+model.aux_kk=3", r"model\.aux_kk for aeforge\.models\.sae\.SAEBank"),
    ],
    ids=["topk", "relu", "bank"],
)
def test_misspelt_activation_or_bank_key_is_refused(experiment, override, message):
    """The activation and the bank have typed signatures (the bank used to pass **kwargs through)."""
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([f"experiment={experiment}", override]))


def test_activation_instance_required():
    with pytest.raises(TypeError, match="an activation object"):
        SparseAutoencoder(8, 16, "topk")


def test_batchtopk_keeps_k_times_batch_and_its_threshold_follows_the_ema():
    torch.manual_seed(0)
    k, beta, n = 3, 0.9, 16
    sae = SparseAutoencoder(8, 32, acts.BatchTopK(k=k, threshold_beta=beta), aux_k=0)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: the batch-wide top-k*n are all non-zero
    assert float(sae.threshold) < 0  # unset before the first training batch
    x1, x2 = torch.randn(n, 8), torch.randn(n, 8)
    f1 = sae.codes(x1)
    assert int((f1 != 0).sum()) == k * n  # over the batch, not per token
    a1 = sae.pre_acts(x1 - sae.b_dec).clamp_min(0).detach()
    kth1 = a1.flatten().topk(k * n).values.min()
    assert torch.equal(f1, a1 * (a1 >= kth1))  # exactly the k*n largest of the batch
    assert float(sae.threshold) == pytest.approx(float(kth1))  # first batch: the smallest kept activation
    f2 = sae.codes(x2)
    assert int((f2 != 0).sum()) == k * n
    kth2 = sae.pre_acts(x2 - sae.b_dec).clamp_min(0).detach().flatten().topk(k * n).values.min()
    expected = beta * float(kth1) + (1 - beta) * float(kth2)  # then θ ← β θ + (1 − β) min kept
    assert float(sae.threshold) == pytest.approx(expected, rel=1e-6)
    sae.eval()  # inference: a fixed threshold per token, no batch coupling
    x3 = torch.randn(5, 8)
    a3 = sae.pre_acts(x3 - sae.b_dec).clamp_min(0).detach()
    assert torch.equal(sae.codes(x3), a3 * (a3 > expected))
    assert torch.equal(sae.codes(x3[:1]), sae.codes(x3)[:1])
    assert float(sae.threshold) == pytest.approx(expected, rel=1e-6)  # eval leaves it alone


def test_jumprelu_straight_through_gradient_matches_the_pseudo_derivative():
    """θ = exp(t), ε = bandwidth, K = 1[|u| < ½]: ∂/∂t Σ π·H(π − θ) = Σ −(θ/ε)·K((π − θ)/ε)·θ and
    ∂/∂t Σ H(π − θ) = Σ −(1/ε)·K((π − θ)/ε)·θ; ∂/∂π of the gate is H(π − θ)."""
    from aeforge.nn.sparse_ops import heaviside_step, jumprelu

    eps = 0.5
    # one latent, θ = 2: 1.8 and 2.2 lie inside the window |π − θ| < ε/2, 2.3 and the rest outside
    pre = torch.tensor([[1.8], [2.2], [2.3], [1.0], [3.0]], requires_grad=True)
    t = torch.tensor([math.log(2.0)], requires_grad=True)
    jumprelu(pre, t, eps).sum().backward()
    assert t.grad.item() == pytest.approx(-(2.0 / eps) * 2 * 2.0)  # -16
    assert torch.equal(pre.grad.flatten(), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))
    t.grad = None
    heaviside_step(pre.detach(), t, eps).sum().backward()
    assert t.grad.item() == pytest.approx(-(1.0 / eps) * 2 * 2.0)  # -8
    # many latents, random upstream gradient: the same formula per latent
    torch.manual_seed(0)
    pre = torch.rand(64, 6) * 2
    t = torch.log(torch.rand(6) + 0.5).requires_grad_(True)
    g = torch.randn(64, 6)
    (jumprelu(pre, t, eps) * g).sum().backward()
    theta = t.detach().exp()
    kernel = ((pre - theta).abs() < eps / 2).float()
    assert torch.allclose(t.grad, (g * -(theta / eps) * kernel).sum(0) * theta, atol=1e-5)
    assert kernel.sum() > 0 and (kernel == 0).any()  # both sides of the window are exercised


@pytest.mark.parametrize("var_flag", [True, False])
def test_vsae_kl_is_the_gaussian_closed_form(var_flag):
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²) per latent, summed over latents, mean over tokens;
    without a variance head σ = 1 and it is ½μ²."""
    from torch.distributions import Normal, kl_divergence

    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 16, acts.VSAE(k=4, var_flag=var_flag), aux_k=0)
    log_var = torch.linspace(-1.5, 1.0, 16)
    if var_flag:
        with torch.no_grad():
            sae.W_sigma.zero_()
            sae.b_sigma.copy_(log_var)  # a known log-variance per latent
    x = torch.randn(32, 8)
    out = sae(x)
    mu = sae.pre_acts(out.x - sae.b_dec).clamp_min(0)
    std = (0.5 * log_var).exp() if var_flag else torch.ones(16)
    expected = kl_divergence(Normal(mu, std.expand_as(mu)), Normal(0.0, 1.0)).sum(-1).mean()
    assert torch.allclose(out.kl, expected, rtol=1e-5, atol=1e-6)
