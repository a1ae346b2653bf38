"""The LightningModule: lr rule and schedule, weight-decay groups, online probe, EMA, AE/VAE objectives."""

from __future__ import annotations

import math

import pytest
import torch

from aeforge.callbacks.ema import EMA
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


def test_warmup_follows_the_epoch_length_when_max_steps_ends_the_run():
    """max_epochs=-1, max_steps=24, 4 batches an epoch, warmup_epochs=2: warmup is 8 steps (not 2 x 24), the lr
    peaks there and the cosine reaches min_lr at the last step (before: the lr rose for the whole run)."""
    import pytorch_lightning as pl

    from aeforge.models.ae import MLPAutoencoder

    class LR(pl.Callback):
        def __init__(self):
            self.lr = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # the lr this step uses
            self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])

    torch.manual_seed(0)
    data = [{"x": torch.rand(8, 1, 4, 4)} for _ in range(4)]
    module = AEModule(MLPAutoencoder((1, 4, 4), [8], 2), Objective({"recon": PixelMSE()}),
                      OptimSettings(lr=1e-3, warmup_epochs=2, min_lr=0.0))
    rec = LR()
    trainer = pl.Trainer(max_epochs=-1, max_steps=24, limit_val_batches=0, logger=False, callbacks=[rec],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    lr = rec.lr
    assert len(lr) == 24
    peak = max(range(len(lr)), key=lr.__getitem__)
    assert peak == 8 and lr[peak] == pytest.approx(1e-3)
    assert lr[:9] == pytest.approx([1e-3 * s / 8 for s in range(9)])
    assert all(a > b for a, b in zip(lr[peak:], lr[peak + 1:]))  # decays from the peak ...
    assert lr[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))  # ... to the end of the run


class _Host:
    """What EMA reads of a LightningModule: `.model` and `.device`."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")


def test_ema_decay_arithmetic_is_exact():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, -8.0], [0.5, 2.0]]))
    ema, host = EMA(decay=0.75), _Host(model)
    ema.on_fit_start(None, host)
    old = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[8.0, 0.0], [2.5, -2.0]]))
    ema.on_train_batch_end(None, host, None, None, 0)
    # ema = d * old + (1 - d) * new, exactly (values chosen representable in binary)
    assert torch.equal(ema.shadow["weight"], 0.75 * old + 0.25 * model.weight.detach())
    torch.manual_seed(0)
    new = torch.randn(2, 2)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.copy_(new)
    ema.on_train_batch_end(None, host, None, None, 1)
    assert torch.allclose(ema.shadow["weight"], 0.75 * before + 0.25 * new, rtol=0, atol=1e-6)


def test_ema_swaps_in_for_validation_and_back_for_training():
    model = torch.nn.Linear(3, 1)
    ema, host = EMA(decay=0.5), _Host(model)
    trainer = type("T", (), {"sanity_checking": False})()
    ema.on_fit_start(trainer, host)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a training step moved the raw weights
    ema.on_train_batch_end(trainer, host, None, None, 0)
    raw = {k: p.detach().clone() for k, p in model.named_parameters()}
    averaged = {k: v.clone() for k, v in ema.shadow.items()}
    assert all(not torch.equal(raw[k], averaged[k]) for k in raw)
    ema.on_validation_start(trainer, host)
    assert all(torch.equal(p, averaged[k]) for k, p in model.named_parameters())  # validation sees the EMA
    ema.on_validation_end(trainer, host)
    assert all(torch.equal(p, raw[k]) for k, p in model.named_parameters())  # training resumes on the raw weights
    assert all(torch.equal(ema.shadow[k], averaged[k]) for k in raw)
    # the sanity check validates the raw weights (nothing averaged yet) and swaps nothing
    trainer.sanity_checking = True
    ema.on_validation_start(trainer, host)
    assert all(torch.equal(p, raw[k]) for k, p in model.named_parameters())
