"""`ckpt=<path>`: a fresh run starting from another run's model weights (chaining stages)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aeforge.config import ConfigError
from aeforge.train import init_from_checkpoint
from tests.conftest import run_train


class Stage(nn.Module):
    def __init__(self, width: int = 4, extra: bool = False):
        super().__init__()
        self.encoder = nn.Linear(width, width)
        self.detail = nn.Linear(width, width) if extra else None


def _save(tmp_path, model: nn.Module):
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


def test_later_stage_keeps_its_new_weights_and_takes_the_shared_ones(tmp_path):
    torch.manual_seed(0)
    stage_a = Stage()
    path = _save(tmp_path, stage_a)
    stage_b = Stage(extra=True)
    detail_before = stage_b.detail.weight.clone()
    counts = init_from_checkpoint(stage_b, path)
    assert torch.equal(stage_b.encoder.weight, stage_a.encoder.weight)
    assert torch.equal(stage_b.detail.weight, detail_before)
    assert counts == {"ckpt/loaded": 2, "ckpt/new": 2, "ckpt/unused": 0}


def test_wrong_checkpoint_is_one_clear_error(tmp_path):
    path = _save(tmp_path, Stage(width=4))
    with pytest.raises(ConfigError, match=r"encoder.weight \(4, 4\) vs \(8, 8\)"):
        init_from_checkpoint(Stage(width=8), path)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.decoder.w": torch.zeros(1)}}, other)
    with pytest.raises(ConfigError, match="no weight of this model"):
        init_from_checkpoint(Stage(), str(other))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        init_from_checkpoint(Stage(), str(tmp_path / "missing.ckpt"))


def test_chained_run_starts_from_the_first_runs_weights(tmp_path):
    run_train(["experiment=mae_mnist", "debug=smoke", "evaluate=false"], tmp_path / "a")
    first = next((tmp_path / "a").rglob("last.ckpt"))
    proc = run_train(["experiment=mae_mnist", "debug=smoke", "evaluate=false", f"ckpt={first}",
                      "trainer.max_steps=1", "trainer.limit_train_batches=1"], tmp_path / "b")
    assert "weights loaded; 0 new in this model" in proc.stdout + proc.stderr
    second = torch.load(next((tmp_path / "b").rglob("last.ckpt")), weights_only=True)
    assert second["global_step"] == 1  # a fresh run: the step count starts again
