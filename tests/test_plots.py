"""The loss-curve callback: the history JSON every epoch, the PNG every `every_n_epochs` and at the end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from aeforge.callbacks.plots import LossCurvePlot


def test_loss_curve_draws_every_n_epochs_and_at_the_end(tmp_path, monkeypatch):
    drawn = []
    original = LossCurvePlot.plot

    def plot(self, out, draw=True):
        original(self, out, draw)
        drawn.append(draw)

    monkeypatch.setattr(LossCurvePlot, "plot", plot)
    cb = LossCurvePlot(every_n_epochs=3)
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path), max_epochs=7, max_steps=-1,
                              global_step=0, callback_metrics={}, log_every_n_steps=1)
    for epoch in range(7):
        trainer.current_epoch, trainer.global_step = epoch, epoch + 1
        trainer.callback_metrics = {"train/loss_epoch": torch.tensor(1.0 / (epoch + 1))}
        cb.on_train_epoch_start(trainer, None)
        cb.on_train_epoch_end(trainer, None)
        assert len(json.loads((tmp_path / "loss_history.json").read_text())["train/loss_epoch"]) == epoch
    cb.on_train_end(trainer, None)
    # epochs 3 and 6 draw; epoch 7 is the last, whose curve on_train_end draws (once, not twice)
    assert drawn == [False, False, True, False, False, True, False, True]
    assert (tmp_path / "loss_curve.png").is_file()
    assert len(json.loads((tmp_path / "loss_history.json").read_text())["train/loss_epoch"]) == 7


def test_loss_curve_refuses_zero_epochs():
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        LossCurvePlot(every_n_epochs=0)
