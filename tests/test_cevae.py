"""StRegA / ceVAE (card 11): the context corruption, the lesion data and its masks, the loss mixing, Dice and
the post-processing on hand examples, a tiny run whose maps beat chance, and bad-input errors.
CPU proof (ceVAE vs plain VAE on the lesion proxies): scripts/proof_cevae.py, docs/methods/strega.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.data.lesions import LesionImageDataModule, brainlike_images, foreground_mask, paste_lesions
from aeforge.data.sources import DataFileError
from aeforge.eval import Evaluation
from aeforge.eval.anomaly_maps import AnomalyMapMetrics, dice, dice_per_image
from aeforge.models.cevae import ContextEncodingVAE, area_opening, context_corrupt, otsu_threshold
from aeforge.objectives.cevae import CeVAEObjective, ContextEncodingL1, MeanGaussianKL
from aeforge.objectives.kl import GaussianKL
from aeforge.objectives.reconstruction import PixelL1

DATA = dict(batch_size=32, num_workers=0, mean=[0.0], std=[1.0])


def small_lesions(**kw) -> LesionImageDataModule:
    return LesionImageDataModule(**{**dict(num_train=16, num_val=8, num_test=24, image_size=32), **DATA, **kw})


# -- context-encoding corruption ----------------------------------------------------------------------------
def test_context_corruption_leaves_the_rest_bit_identical():
    x = torch.randn(64, 2, 20, 24)
    g = torch.Generator().manual_seed(0)
    out, mask = context_corrupt(x, max_squares=3, max_size=0.5, generator=g)
    assert mask.shape == (64, 1, 20, 24) and mask.any() and not mask.all()
    keep = ~mask.expand_as(x)
    assert torch.equal(out[keep], x[keep])  # bit-identical outside the squares
    lo, hi = x.flatten(1).amin(1), x.flatten(1).amax(1)
    for i in range(64):
        inside = out[i][mask[i].expand_as(x[i])]
        assert ((inside >= lo[i]) & (inside <= hi[i])).all()  # fill drawn in [min, max] of that image
    # squares are at most max_size x the side: no column of the mask is longer than 10 px per square x 3
    assert mask.sum((2, 3)).max() <= 3 * 10 * 10
    # through the model: the corrupted input it trains the CE branch on obeys the same rule
    model = ContextEncodingVAE((1, 20, 20), [4, 8], 8).train()
    o = model({"x": torch.rand(8, 1, 20, 20)})
    assert o["recon_ce"].shape == (8, 1, 20, 20) and o["ce_mask"].any()
    x_in = torch.rand(8, 1, 20, 20)
    torch.manual_seed(1)
    o = model({"x": x_in})
    assert torch.equal(o["x_ce"][~o["ce_mask"]], x_in[~o["ce_mask"]])


def test_full_size_network_shapes():
    """The compact StRegA widths (16, 64, 256, 1024), z 1024, on a non-power-of-two side (padded, cropped)."""
    model = ContextEncodingVAE((1, 28, 28), [16, 64, 256, 1024], 1024).eval()
    out = model({"x": torch.rand(2, 1, 28, 28)})
    assert out["recon"].shape == (2, 1, 28, 28) and out["mu"].shape == (2, 1024)
    assert model.anomaly_map({"x": torch.rand(2, 1, 28, 28)}).shape == (2, 1, 28, 28)


# -- lesion data --------------------------------------------------------------------------------------------
def test_lesion_masks_match_the_generated_lesions():
    dm = small_lesions()
    clean = brainlike_images(24, 32, seed=1)  # the test split's clean slices (lesion_seed 0 + 1)
    x, mask = dm.test_set.x.numpy(), dm.test_set.mask.numpy().astype(bool)
    fg, anomaly = dm.test_set.foreground.numpy().astype(bool), dm.test_set.anomaly.numpy()
    changed = (x != clean).any(1, keepdims=True)
    assert not (changed & ~mask).any()  # nothing outside a mask changed
    assert changed[mask].mean() > 0.9  # and (almost) every mask pixel did (a fill can equal the old value)
    assert not (mask & ~fg).any()  # lesions stay inside the brain
    np.testing.assert_array_equal(anomaly, mask.any((1, 2, 3)))
    assert 0 < anomaly.sum() < len(anomaly)
    assert not (dm.train_set.mask.any() or dm.train_set.anomaly.any())  # training data is normal only
    # deterministic by seed; another lesion_seed gives other lesions
    assert torch.equal(small_lesions().test_set.mask, dm.test_set.mask)
    assert not torch.equal(small_lesions(lesion_seed=3).test_set.mask, dm.test_set.mask)
    batch = next(iter(dm.eval_dataloader("test", 8)))
    assert batch["anomaly_mask"].shape == (8, 1, 32, 32) and batch["anomaly"].shape == (8,)
    assert batch["x"].dtype == torch.uint8  # normalised on the device, not in the loader


def test_paste_lesions_bright_and_dark():
    x = np.full((40, 1, 16, 16), 128, np.uint8)
    fg = np.ones_like(x, bool)
    out, mask = paste_lesions(x, fg, seed=0, max_lesions=2, radius=(0.1, 0.2), bright_prob=0.5)
    inside = out[mask]
    assert (inside >= 150).any() and (inside <= 100).any() and not ((inside > 100) & (inside < 150)).any()


# -- loss ------------------------------------------------------------------------------------------------
def test_objective_mixes_the_two_branches():
    torch.manual_seed(0)
    model = ContextEncodingVAE((1, 16, 16), [4, 8], 6).train()
    batch = {"x": torch.rand(4, 1, 16, 16)}
    out = model(batch)
    terms = {"rec": PixelL1(weight=2.0), "kl": MeanGaussianKL(weight=0.01), "ce": ContextEncodingL1()}
    got = CeVAEObjective(terms, ce_factor=0.3)(out, batch)
    rec = (out["recon"] - batch["x"]).abs().mean()
    ce = (out["recon_ce"] - batch["x"]).abs().mean()
    kl = GaussianKL()(out, batch) / 6  # averaged over latent dims (StRegA), not summed
    torch.testing.assert_close(got["kl"], kl)
    torch.testing.assert_close(got["loss"], 0.7 * (2.0 * rec + 0.01 * kl) + 0.3 * ce)
    # ce_factor = 0: the plain VAE, whose model has no CE output, trains with the VAE terms only
    plain = ContextEncodingVAE((1, 16, 16), [4, 8], 6, context_encoding=False)
    out = plain(batch)
    assert "recon_ce" not in out
    got = CeVAEObjective(terms, ce_factor=0.0)(out, batch)
    assert "ce" not in got and torch.isfinite(got["loss"])
    with pytest.raises(ValueError, match="ce_factor"):
        CeVAEObjective(terms, ce_factor=1.5)


# -- Dice and post-processing on hand examples ------------------------------------------------------------
def test_dice_and_postprocessing_hand_examples():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    target = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert dice(pred, target) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0  # empty vs empty
    assert dice(np.ones(4, bool), np.zeros(4, bool)) == 0.0
    np.testing.assert_allclose(dice_per_image(np.stack([pred, pred]), np.stack([target, pred])), [2 / 3, 1.0])
    with pytest.raises(ValueError, match="shape"):
        dice(pred, target[:1])
    values = np.concatenate([np.full(100, 0.1), np.full(20, 0.9)])
    assert 0.1 <= otsu_threshold(values) < 0.9
    m = np.zeros((8, 8), bool)
    m[0, 0] = True  # 1-pixel speck: removed
    m[4:7, 4:7] = True  # 9-pixel blob: kept
    np.testing.assert_array_equal(area_opening(m, 3), m & (np.arange(8)[:, None] >= 4))
    # the model's chain: a bright spot inside the foreground survives, its 1-px copy outside does not
    model = ContextEncodingVAE((1, 16, 16), [4, 8], 4, opening_area=3).eval()
    seg = model.segment({"x": torch.rand(2, 1, 16, 16), "foreground": torch.ones(2, 1, 16, 16, dtype=torch.uint8)})
    assert seg.shape == (2, 1, 16, 16) and seg.dtype == torch.bool


# -- a tiny run beats chance --------------------------------------------------------------------------------
def test_tiny_run_maps_beat_chance(tmp_path):
    torch.manual_seed(0)
    dm = LesionImageDataModule(num_train=256, num_val=32, num_test=64, image_size=32, lesion_radius=[0.08, 0.16],
                               **DATA)
    model = ContextEncodingVAE((1, 32, 32), [8, 16, 32], 32, opening_area=4)
    obj = CeVAEObjective({"rec": PixelL1(), "kl": MeanGaussianKL(weight=0.01), "ce": ContextEncodingL1()})
    ev = Evaluation({"maps": AnomalyMapMetrics(out_dir=str(tmp_path))}, batch_size=64)
    untrained = ev(model, dm, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = dm.train_set.x.float() / 255
    model.train()
    for _ in range(40):
        batch = {"x": x[torch.randint(len(x), (32,))]}
        loss = obj(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = ev(model, dm, torch.device("cpu"))
    # chance is 0.5 (the untrained map, |x| in effect, scores ~0.5: bright lesions high, dark ones low)
    assert m["maps/pixel_auroc"] > 0.75 and m["maps/pixel_auroc"] > untrained["maps/pixel_auroc"] + 0.2, (m, untrained)
    assert m["maps/pixel_auprc"] > 2 * m["maps/lesion_pixel_rate"], m
    assert 0 < m["maps/dice_best"] <= 1 and 0 <= m["maps/dice_val_threshold"] <= m["maps/dice_best"] + 1e-9
    assert {"maps/dice_postproc", "maps/image_auroc", "maps/threshold_val"} <= set(m)
    assert (tmp_path / "anomaly_maps.png").is_file()


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataFileError, match=r"data.source='mri'.*brainlike.*npz"):
        small_lesions(source="mri")
    with pytest.raises(DataFileError, match="data.path"):
        small_lesions(source="npz")
    with pytest.raises(DataFileError, match="data not found"):
        small_lesions(source="npz", path=str(tmp_path / "nope.npz"))
    bad = tmp_path / "rgb.npz"
    np.savez(bad, x=np.zeros((10, 8, 8, 3), np.uint8), y=np.zeros(10), x_test=np.zeros((4, 8, 8, 3), np.uint8),
             y_test=np.zeros(4))
    with pytest.raises(DataFileError, match="3-channel"):
        small_lesions(source="npz", path=str(bad), num_val=2)
    with pytest.raises(DataFileError, match="lesion_fraction"):
        small_lesions(lesion_fraction=1.0)
    with pytest.raises(DataFileError, match="no foreground"):
        paste_lesions(np.zeros((1, 1, 8, 8), np.uint8), foreground_mask(np.zeros((1, 1, 8, 8), np.uint8), 0), 0, 1,
                      (0.1, 0.2), 0.5)
    with pytest.raises(ValueError, match=r"model.diff='sq'.*abs"):
        ContextEncodingVAE((1, 16, 16), [4], 4, diff="sq")
    with pytest.raises(ValueError, match="splits"):
        small_lesions().eval_dataloader("holdout", 4)
