"""The SAE and its bank (aeforge/models/sae.py): decoder constraint, the typed per-site output, and
dictionary recovery on synthetic superposition."""

from __future__ import annotations

import numpy as np
import torch

from aeforge.models.sae import SAEBank, SiteOutput
from aeforge.models.sae_activations import ReLU, TopK
from aeforge.objectives.sparsity import SAEObjective


def test_decoder_rows_unit_norm_and_parallel_grad_removed():
    torch.manual_seed(0)
    bank = SAEBank((1, 16), TopK(k=4), n_latents=64, aux_k=0)
    obj = SAEObjective(aux_coef=0)
    opt = torch.optim.Adam(bank.parameters(), lr=1e-2)
    for step in range(5):
        loss = obj(bank({"x": torch.randn(64, 1, 16)}), {})["loss"]
        opt.zero_grad()
        loss.backward()
        w, g = bank.saes[0].W_dec.detach(), bank.saes[0].W_dec.grad
        assert (g * w).sum(1).abs().max() < 1e-6  # no component along the (unit) rows
        opt.step()
        bank.on_train_step_end(step, 5)
        norms = bank.saes[0].W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_site_output_is_typed_and_codes_agree():
    """Sparse and dense activations fill the same SiteOutput; counts and dense codes agree with l0."""
    torch.manual_seed(0)
    x = torch.randn(32, 2, 8)
    for activation in (TopK(k=3), ReLU()):
        bank = SAEBank((2, 8), activation, n_latents=24, aux_k=0)
        out = bank({"x": x})
        assert set(out) == {"sites", "recon"} and out["recon"].shape == x.shape
        for o in out["sites"]:
            assert isinstance(o, SiteOutput) and o.kl is None and o.kstar is None
            dense = o.dense_codes(24)
            assert torch.equal((dense != 0).sum(1).float(), o.l0)
            assert torch.equal(o.firing_counts(24), (dense != 0).sum(0))
            assert torch.equal(o.fired, o.firing_counts(24) > 0)


def superposition(n, d, atoms, rng):
    """Tokens = non-negative sparse combinations of unit atoms (|S| ~ 1 + Poisson(2)), 1% noise."""
    x = np.zeros((n, d), np.float32)
    for i in range(n):
        s = rng.choice(len(atoms), min(1 + rng.poisson(2), 6), replace=False)
        x[i] = (rng.uniform(0.5, 1.5, len(s))[:, None] * atoms[s]).sum(0)
    return torch.from_numpy(x + 0.01 * rng.standard_normal(x.shape).astype(np.float32))


def test_topk_recovers_superposed_dictionary():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    d, n_atoms = 32, 48
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    bank = SAEBank((1, d), TopK(k=4), n_latents=96, aux_k=32, dead_tokens=2048)
    obj = SAEObjective(recon="mse", aux_coef=1 / 32)
    opt = torch.optim.Adam(bank.parameters(), lr=2e-3, betas=(0.9, 0.99))
    for step in range(1500):
        x = superposition(256, d, atoms, rng)
        loss = obj(bank({"x": x[:, None]}), {})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        bank.on_train_step_end(step, 1500)
    w = bank.saes[0].W_dec.detach()
    cos = torch.from_numpy(atoms) @ (w / w.norm(dim=1, keepdim=True)).t()
    recovered = (cos.max(1).values >= 0.9).float().mean().item()
    bank.eval()
    x = superposition(2048, d, atoms, rng)
    o = bank.saes[0](x)
    fvu = ((o.recon_raw - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert recovered >= 0.8, recovered
    assert fvu < 0.1, fvu


def test_fit_pre_bias_is_the_geometric_median():
    """`init_pre_bias: true` starts each site's b_dec at the geometric median of held-out tokens (Weiszfeld):
    robust to the far outlier that drags the mean."""
    bank = SAEBank((2, 3), TopK(k=2), n_latents=8, init_pre_bias=True)
    centre = torch.tensor([1.0, -2.0, 0.5])
    # the centre, 6 points around it and one far away: the median is the centre, the mean is ~12 away
    x = centre + torch.cat([torch.zeros(1, 3), torch.eye(3), -torch.eye(3), torch.full((1, 3), 100.0)])
    bank.fit_pre_bias(torch.stack([x, 2 * x], 1))
    assert (x.mean(0) - centre).norm() > 10
    assert torch.allclose(bank.saes[0].b_dec, centre, atol=0.01)  # 50 Weiszfeld steps: within 0.005
    assert torch.allclose(bank.saes[1].b_dec, 2 * centre, atol=0.02)
