"""SAE activations (aeforge/models/sae_activations.py): each selection rule, AuxK, a training step of every
variant, and the config check that refuses a misspelt activation key."""

from __future__ import annotations

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
