"""ZO-AE-DS (card 13): the black box is query-only and counts queries, RGE/CGE match the gradient of a
quadratic (RGE in expectation, CGE exactly), Cohen et al.'s radius and abstain rule on hand examples, a tiny
ZO run lowers its loss, and a missing checkpoint is a clear error. Real-data proof: scripts/proof_zo_ae_ds.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from aeforge.eval.certify import certified_accuracy, certify_from_counts, lower_confidence_bound
from aeforge.models.zo_ae_ds import ZOAEDS, BlackBox, ZOClassifier, cge, rge

SHAPE = (3, 32, 32)


def tiny(estimator: str, **kw) -> ZOAEDS:
    torch.manual_seed(0)
    return ZOAEDS(SHAPE, 4, None, None, [4, 8], [4, 8, 8, 8], 3, 4, estimator=estimator, queries=8,
                  allow_random=True, **kw)


def sensitive(m: ZOAEDS) -> ZOAEDS:
    """A random stand-in whose black box actually responds to z (random decoder + classifier are nearly
    constant), in float64 so that finite differences at mu = 1e-3 are exact to many digits; BN frozen."""
    with torch.no_grad():
        for scale, part in ((2, m.encoder), (4, m.blackbox.decoder), (20, m.blackbox.classifier.head)):
            for p in part.parameters():
                p.mul_(scale)
    m.double().train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    return m


def quadratic(a: torch.Tensor, b: torch.Tensor):
    """f(z) = 1/2 z^T A z + b^T z per row; gradient A z + b; exact under mu-smoothing (odd terms cancel)."""
    return lambda z: 0.5 * ((z @ a) * z).sum(1) + z @ b


def test_black_box_is_query_only_and_counts():
    m = tiny("rge")
    m.train()
    x, y = torch.rand(5, *SHAPE), torch.randint(4, (5,))
    out = m({"x": x, "y": y})
    assert not out["logits"].requires_grad  # queried outputs carry no graph
    out["zo_loss"].mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in m.blackbox.parameters())
    assert all(p.grad is not None for p in m.denoiser.parameters())  # the white box gets J^T g
    # target query (5) + loss at z (5) + q = 8 directions per sample (40)
    assert m.blackbox.queries == 5 + 5 + 5 * 8
    assert not m.blackbox.training  # frozen: BN statistics never move
    z = torch.randn(3, 8, requires_grad=True)
    assert not m.blackbox.query(z).requires_grad
    c = tiny("cge")
    c.train()
    c({"x": x, "y": y})["zo_loss"].mean().backward()
    assert c.blackbox.queries == 5 + 5 + 5 * 2 * 8  # CGE: 2d with d = 8


def test_fo_reference_uses_the_true_gradient():
    """FO and CGE (mu small) back-propagate nearly the same gradient into the front-end."""
    grads = {}
    for est in ("fo", "cge"):
        m = sensitive(tiny(est, noise_std=0.0, mu=1e-4))
        torch.manual_seed(1)
        x, y = torch.rand(4, *SHAPE, dtype=torch.float64), torch.randint(4, (4,))
        m({"x": x, "y": y})["zo_loss"].mean().backward()
        grads[est] = torch.cat([p.grad.flatten() for p in m.encoder.parameters()])
    assert grads["fo"].norm() > 0
    cos = torch.nn.functional.cosine_similarity(grads["fo"], grads["cge"], dim=0)
    assert cos > 0.99


def test_rge_and_cge_recover_a_known_gradient():
    g = torch.Generator().manual_seed(0)
    d = 6
    q = torch.randn(d, d, generator=g)
    a, b = q @ q.T / d, torch.randn(d, generator=g)
    f = quadratic(a, b)
    z = torch.randn(3, d, generator=g)
    true = z @ a + b
    torch.testing.assert_close(cge(f, z, mu=1e-2), true, rtol=1e-3, atol=1e-3)  # exact for a quadratic
    torch.manual_seed(0)
    for directions in ("sphere", "gaussian"):
        reps = torch.stack([rge(f, z, f(z), 1000, 1e-3, directions) for _ in range(4)]).mean(0)
        err = (reps - true).norm() / true.norm()
        assert err < 0.1, (directions, float(err))
    # with few queries the estimate is noisy but still unbiased: its error shrinks as q grows
    torch.manual_seed(0)
    few = (rge(f, z, f(z), 10, 1e-3) - true).norm()
    many = (rge(f, z, f(z), 2000, 1e-3) - true).norm()
    assert many < few


def test_certification_radius_on_a_hand_example():
    n, n_a, alpha, sigma = 100, 99, 0.001, 0.5
    p_lower = lower_confidence_bound(n_a, n, alpha)
    assert p_lower == pytest.approx(stats.beta.ppf(alpha, n_a, n - n_a + 1))
    counts0, counts = np.array([1, 9, 0]), np.array([1, n_a, 0])
    pred, radius = certify_from_counts(counts0, counts, alpha, sigma)
    assert pred == 1 and radius == pytest.approx(sigma * stats.norm.ppf(p_lower))
    # all n agree: p_lower = alpha^(1/n) in closed form
    _, r_all = certify_from_counts(np.array([0, 5]), np.array([0, n]), alpha, sigma)
    assert r_all == pytest.approx(sigma * stats.norm.ppf(alpha ** (1 / n)))
    # certified accuracy: correct AND radius >= r
    acc = certified_accuracy(np.array([1, 1, 0, -1]), np.array([0.3, 0.6, 0.9, -1.0]), np.array([1, 1, 1, 1]),
                             [0.0, 0.5])
    assert acc == {"certified_acc@0": 0.5, "certified_acc@0.5": 0.25}


def test_abstain_rule():
    # 55 of 100 for the top class: the lower bound at alpha 0.001 is below 1/2 -> abstain
    assert certify_from_counts(np.array([0, 10]), np.array([45, 55]), 0.001, 0.25) == (-1, -1.0)
    # the selection's class is kept even if the estimation favours another one (no re-selection)
    assert certify_from_counts(np.array([10, 0]), np.array([5, 95]), 0.001, 0.25)[0] == -1
    pred, radius = certify_from_counts(np.array([10, 0]), np.array([95, 5]), 0.001, 0.25)
    assert pred == 0 and radius > 0
    assert lower_confidence_bound(0, 10, 0.01) == 0.0


def test_tiny_zo_run_lowers_its_loss():
    """CGE on the encoder output of a fixed batch: the black-box CE falls with ZO gradients only."""
    m = sensitive(tiny("cge", noise_std=0.0, target="label"))
    torch.manual_seed(0)
    x, y = torch.rand(4, *SHAPE, dtype=torch.float64), torch.randint(4, (4,))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(10):
        loss = m({"x": x, "y": y})["zo_loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


def test_missing_checkpoint_and_bad_keys_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.classifier_ckpt is null.*zo_cifar10_classifier"):
        ZOAEDS(SHAPE, 4, None, None, [4, 8], [4, 8, 8, 8], 3, 4)
    with pytest.raises(ValueError, match="valid choices are"):
        tiny("adam")
    with pytest.raises(FileNotFoundError, match="model.classifier_ckpt"):
        ZOAEDS(SHAPE, 4, str(tmp_path / "nope.ckpt"), None, [4, 8], [4, 8, 8, 8], 3, 4)
    # a checkpoint of another width: the error names the widths keys
    torch.save({"state_dict": {f"model.{k}": v for k, v in ZOClassifier(SHAPE, 4, [4, 6]).state_dict().items()}},
               tmp_path / "clf.ckpt")
    with pytest.raises(ValueError, match="widths"):
        ZOAEDS(SHAPE, 4, str(tmp_path / "clf.ckpt"), None, [4, 8], [4, 8, 8, 8], 3, 4, allow_random=True)
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        ZOAEDS((1, 28, 28), 4, None, None, [4, 8], [4, 8, 8, 8], 3, 4, allow_random=True)


def test_black_box_without_bottleneck_queries_images():
    m = tiny("rge", bottleneck=False)
    assert isinstance(m.blackbox, BlackBox) and m.blackbox.decoder is None and not hasattr(m, "encoder")
    assert m.encode({"x": torch.rand(2, *SHAPE)}).shape == (2, math.prod(SHAPE))
