"""The LightningModule: lr rule and schedule, weight-decay groups, online probe, EMA, AE/VAE objectives."""

from __future__ import annotations

import math

import pytest
import torch

from aeforge.models.mae import MAE
from aeforge.models.vae import GaussianVAE
from aeforge.modules.base import AEModule
from aeforge.modules.optim import OptimSettings, warmup_cosine
from aeforge.objectives import Objective
from aeforge.objectives.kl import GaussianKL
from aeforge.objectives.reconstruction import MaskedPatchMSE, PixelMSE
from aeforge.train import run
from tests.conftest import compose_cfg


def test_warmup_cosine_schedule():
    f = lambda s: warmup_cosine(s, warmup=10, total=110, base_lr=1.0, min_lr=0.1, cosine=True)
    assert f(0) == 0 and f(5) == 0.5 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1)


def test_blr_rule_and_no_decay_groups():
    model = MAE((1, 8, 8), patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
                decoder_num_heads=2)
    obj = Objective({"recon": MaskedPatchMSE()})
    m = AEModule(model, obj, OptimSettings(lr=None, blr=1.5e-4, weight_decay=0.05))

    class T:  # the trainer facts the lr rule reads
        world_size, accumulate_grad_batches = 8, 4
        datamodule = type("DM", (), {"batch_size": 128})()

    m._trainer = T()
    assert m.base_lr() == pytest.approx(1.5e-4 * 4096 / 256)  # MAE's recipe: 2.4e-3
    decay, no_decay = m.param_groups(1.0)[:2]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"encoder.norm.weight", "decoder_pred.bias"}
    assert "encoder.pos_embed" not in names  # fixed sin-cos: a buffer, never optimised


def test_vae_objective_is_negative_elbo():
    torch.manual_seed(0)
    vae = GaussianVAE((1, 4, 4), hidden_dims=[8], latent_dim=2)
    batch = {"x": torch.randn(5, 1, 4, 4)}
    out = vae(batch)
    losses = Objective({"recon": PixelMSE(reduction="sum_per_sample"), "kl": GaussianKL(weight=4.0)})(out, batch)
    kl = (-0.5 * (1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp()).sum(1)).mean()
    assert torch.allclose(losses["kl"], kl)
    assert torch.allclose(losses["loss"], losses["recon"] + 4.0 * kl)  # beta-VAE weight applies
    assert kl.item() >= 0


def test_online_probe_learns_on_real_digits(tmp_path):
    cfg = compose_cfg(["debug=smoke", "trainer.max_steps=60", "trainer.limit_train_batches=60", "data.batch_size=64",
                       "module.online_probe=true", "module.probe_lr=3e-3", "eval=none"], tmp_path)
    run(cfg)
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/probe_acc"] > 0.4  # 10 classes: chance is 0.1
    assert "train/probe_loss" in metrics


def test_ema_callback_tracks_and_swaps(tmp_path):
    cfg = compose_cfg(["debug=smoke", "callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_steps=5",
                       "trainer.limit_train_batches=5", "eval=none"], tmp_path)
    run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ema_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    shadow, live = ema_state["shadow"], ckpt["state_dict"]
    diffs = [(shadow[k] - live[f"model.{k}"]).abs().max().item() for k in shadow]
    assert max(diffs) > 0 and all(math.isfinite(d) for d in diffs)
