"""ARD-VAE: the epoch-start prior refresh changes only the prior (every weight and BatchNorm buffer
bit-identical, training RNG untouched), the hyper-posterior and KL formulas, the 99 % rule on a hand example,
decoder sensitivity against an explicit Jacobian, and a tiny run on data with 2 known factors where the ARD
prior prunes the unused axes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from aeforge.callbacks.ard_prior import ARDPriorRefresh
from aeforge.data.images import ArrayImageDataModule, DataFileError
from aeforge.eval.ard import decoder_sensitivity, relevant_dimensions
from aeforge.models.ard_vae import ARDVAE, ConvARDVAE, hyper_prior_variance
from aeforge.objectives.ard import ARDPriorKL
from aeforge.objectives.kl import GaussianKL
from tests.conftest import load_script


@pytest.fixture(scope="module")
def synthetic_dm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ard") / "factors.npz"
    mean, std = load_script("proof_ard_proto").synthetic_factors(path, factors=2, n_train=2000, n_test=200, seed=0)
    return ArrayImageDataModule(path=str(path), batch_size=100, num_workers=0, mean=[mean], std=[std])


def test_refresh_changes_only_the_prior(synthetic_dm):
    torch.manual_seed(0)
    model = ConvARDVAE((1, 8, 8), latent_dim=6, filters=4, output="none")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    batch = synthetic_dm.device_batch(synthetic_dm.train_set.__getitems__(list(range(64))), torch.device("cpu"))
    model.train()
    for _ in range(3):  # non-trivial weights and BatchNorm running statistics
        out = model(batch)
        loss = (out["recon"] - batch["x"]).pow(2).sum() + ARDPriorKL()(out, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cb = ARDPriorRefresh(num_samples=500, batch_size=128, seed=3)
    trainer = SimpleNamespace(current_epoch=4, datamodule=synthetic_dm)
    cb.on_train_epoch_start(trainer, SimpleNamespace(model=model, device=torch.device("cpu")))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"prior_var", "prior_epoch"}
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # mode restored, training RNG untouched
    assert int(model.prior_epoch) == 4
    # the value: mean of squared posterior samples of the epoch's subset, the same every time (seeded)
    torch.testing.assert_close(model.prior_var, cb.estimate(model, synthetic_dm, torch.device("cpu"), 4))
    assert not torch.allclose(model.prior_var, cb.estimate(model, synthetic_dm, torch.device("cpu"), 5))
    # a resumed run inside epoch 4 keeps the checkpoint's prior
    model.prior_var.fill_(7.0)
    cb.on_train_epoch_start(trainer, SimpleNamespace(model=model, device=torch.device("cpu")))
    assert torch.all(model.prior_var == 7.0)


def test_set_prior_checks_and_floors():
    model = ARDVAE((4,), [8], latent_dim=3, min_prior_var=1e-4)
    model.set_prior(torch.tensor([2.0, 0.0, 1e-9]), epoch=0)
    torch.testing.assert_close(model.prior_var, torch.tensor([2.0, 1e-4, 1e-4]))
    with pytest.raises(ValueError, match="expected"):
        model.set_prior(torch.ones(4), epoch=1)


def test_hyper_posterior_and_kl_formulas():
    torch.manual_seed(0)
    z = torch.randn(500, 4) * torch.tensor([2.0, 0.5, 1.0, 0.01])
    torch.testing.assert_close(hyper_prior_variance(z), z.pow(2).mean(0))  # a0 = b0 = 0
    a0, b0 = 3.0, 2.0
    torch.testing.assert_close(hyper_prior_variance(z, a0, b0), (b0 + 0.5 * z.pow(2).sum(0)) / (a0 + 250))
    mu, logvar, s2 = torch.randn(8, 4), torch.randn(8, 4), torch.rand(4) + 0.1
    got = ARDPriorKL()({"mu": mu, "logvar": logvar, "prior_var": s2}, {})
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros(4), s2.sqrt())).sum(1).mean()
    torch.testing.assert_close(got, ref)
    ones = {"mu": mu, "logvar": logvar, "prior_var": torch.ones(4)}
    torch.testing.assert_close(ARDPriorKL()(ones, {}), GaussianKL()(ones, {}))


def test_99_percent_rule_hand_example():
    rho = torch.tensor([0.04, 0.5, 0.001, 0.15, 0.3, 0.009])  # shares 0.5, 0.8, 0.95, 0.99, 0.999, 1.0
    order, count = relevant_dimensions(rho, 0.99)
    assert order.tolist() == [1, 4, 3, 0, 5, 2] and count == 4  # 0.99 reached exactly at the 4th
    assert relevant_dimensions(rho * 7.0, 0.99)[1] == 4  # scale-free
    assert relevant_dimensions(rho, 0.95)[1] == 3 and relevant_dimensions(rho, 0.9999)[1] == 6
    assert relevant_dimensions(torch.tensor([0.6, 0.395, 0.004, 0.001]), 0.99)[1] == 2
    assert relevant_dimensions(torch.zeros(3))[1] == 0


def test_decoder_sensitivity_matches_jacobian():
    torch.manual_seed(0)
    model = ARDVAE((6,), [5], latent_dim=3)
    mu = torch.randn(10, 3)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda m: model.decode(m[None])[0], m) for m in mu])
    ref = jac.abs().mean(0).pow(2).sum(0)  # jac: (n, D, L)
    torch.testing.assert_close(decoder_sensitivity(model, mu), ref)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataFileError, match="nope.npz"):
        ArrayImageDataModule(path=str(tmp_path / "nope.npz"), batch_size=4, num_workers=0, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="output"):
        ConvARDVAE((1, 28, 28), latent_dim=4, filters=2, output="tanh")


def test_tiny_run_prunes_unused_axes(synthetic_dm):
    """2 known factors, L = 8: after a few epochs with the per-epoch refresh, the 99 % rule keeps far fewer
    than 8 axes, and the kept ones reconstruct about as well as all of them."""
    from aeforge.eval import Evaluation
    from aeforge.eval.ard import ARDRelevance

    torch.manual_seed(0)
    model = ARDVAE((1, 8, 8), [64, 32], latent_dim=8)
    kl = ARDPriorKL()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    cb = ARDPriorRefresh(num_samples=1000, batch_size=500, seed=0)
    cpu = torch.device("cpu")
    for epoch in range(12):
        cb.on_train_epoch_start(SimpleNamespace(current_epoch=epoch, datamodule=synthetic_dm),
                                SimpleNamespace(model=model, device=cpu))
        model.train()
        for batch in synthetic_dm.train_dataloader():
            batch = synthetic_dm.device_batch(batch, cpu)
            out = model(batch)
            loss = (out["recon"] - batch["x"]).pow(2).flatten(1).sum(1).mean() + kl(out, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    m = Evaluation({"ard": ARDRelevance(num_samples=1000, jacobian_samples=50)})(model, synthetic_dm, cpu)
    assert 1 <= m["ard/active_dims"] <= 4, m
    assert m["ard/recon_sse_kept"] < 0.2 * m["ard/recon_sse_none"], m
    assert m["ard/recon_sse_kept"] < 1.5 * m["ard/recon_sse_all"] + 1.0, m


@pytest.mark.benchmark
@pytest.mark.parametrize("factors", [3, 5])
def test_synthetic_factor_count_found(tmp_path, factors):
    """The card's reproduction through the real pipeline (train.py's run): MLP ARD-VAE, L = 16, 30 epochs on a
    frozen-MLP image of k uniform factors; the 99 % rule finds k (docs/methods/ard_vae.md: 3/3 and 5/5 in every
    measured seed)."""
    proof = load_script("proof_ard_proto")
    rows = proof.ard_synthetic([0], 30, factors, tmp_path)
    ard = next(r for r in rows if r["prior"] == "ard")
    assert ard["active_dims"] == factors, ard
    assert ard["recon_sse_kept"] < ard["recon_sse_all"] * 1.05 + 0.01, ard
