"""The `generation` evaluator and the `aeforge-sample` CLI: a generator that draws real images of the requested
class scores a lower proxy FID and a class accuracy near the proxy classifier's real accuracy, a noise generator
scores chance; the proxy classifier is cached; the CLI rebuilds a run's model from its saved config, uses the
EMA weights, honours labels and writes the grid and the npz; bad input names the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from aeforge.data.images import SyntheticImageDataModule
from aeforge.eval import EvalContext
from aeforge.eval.generation import GenerationMetrics, fid_from_features
from aeforge.models.base import AutoencoderModel
from aeforge.sample import main as sample_main
from tests.conftest import compose_cfg

K = 3


def _datamodule() -> SyntheticImageDataModule:
    dm = SyntheticImageDataModule(num_train=96, num_val=48, num_classes=K, channels=1, image_size=12, noise=0.15,
                                  batch_size=32, num_workers=0, mean=[0.5], std=[0.5])
    dm.setup("fit")
    return dm


class RealDraws(nn.Module):
    """A 'perfect' class-conditional generator: real training images of the requested class ([-1, 1])."""

    def __init__(self, dm, noise: bool = False):
        super().__init__()
        x = torch.cat([b["x"] for b in dm.eval_dataloader("train", 96)]).float() / 255 * 2 - 1
        y = torch.cat([b["y"] for b in dm.eval_dataloader("train", 96)])
        self.register_buffer("x", x)
        self.register_buffer("y", y)
        self.num_classes, self.noise = K, noise

    def sample(self, n, labels, guidance, steps, generator):
        if self.noise:
            return torch.rand(n, *self.x.shape[1:], generator=generator) * 2 - 1
        pick = [int(torch.nonzero(self.y == int(c))[i % int((self.y == int(c)).sum())]) for i, c in enumerate(labels)]
        return self.x[pick]

    def reconstruct(self, batch):
        return batch["x"] + 0.05 * torch.randn_like(batch["x"])


def _ctx(model, dm) -> EvalContext:
    return EvalContext(model, dm, torch.device("cpu"), batch_size=32, max_samples=48, max_epochs=None)


def test_generation_metrics_rank_a_real_generator_above_noise(tmp_path):
    dm = _datamodule()
    kw = dict(num_samples=48, steps=2, proxy_epochs=10, proxy_channels=[8, 16], proxy_dim=32, proxy_lr=1e-2,
              proxy_batch_size=16, cache_dir=str(tmp_path),
              out_dir=str(tmp_path))
    good = GenerationMetrics(**kw)(_ctx(RealDraws(dm), dm))
    assert set(good) >= {"fid_proxy", "is_proxy", "precision_proxy", "recall_proxy", "rfid_proxy", "psnr", "ssim",
                         "class_acc_proxy", "real_acc_proxy", "chance"}
    assert not any(k in good for k in ("fid", "is"))  # no Inception numbers without its weights
    assert good["real_acc_proxy"] > 0.9 and good["class_acc_proxy"] > 0.9
    assert len(list(tmp_path.glob("proxy_classifier_*.pt"))) == 1 and (tmp_path / "samples_grid.png").is_file()
    bad = GenerationMetrics(**kw)(_ctx(RealDraws(dm, noise=True), dm))  # the proxy now comes from the cache
    assert bad["real_acc_proxy"] == good["real_acc_proxy"]
    assert bad["fid_proxy"] > 3 * good["fid_proxy"] and bad["class_acc_proxy"] < 0.6
    assert good["precision_proxy"] > bad["precision_proxy"]


def test_fid_from_features_matches_gaussian_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g) * 2 + 1
    # N(0, I) vs N(1, 4I): |Δμ|² + tr(I + 4I − 2·2I) = 2 + 2
    assert abs(fid_from_features(a, b) - 4.0) < 0.3
    with pytest.raises(ValueError, match=r"features='clip'.*valid"):
        GenerationMetrics(features="clip")
    with pytest.raises(ValueError, match="needs inception_weights"):
        GenerationMetrics(features="inception")


class ClassMeans(AutoencoderModel):
    """A tiny class-conditional generator for the CLI test: one learnable image per class + seeded noise."""

    def __init__(self, input_shape: list[int], num_classes: int = K):
        super().__init__()
        self.means = nn.Parameter(torch.zeros(num_classes, *input_shape))
        self.num_classes = num_classes

    def forward(self, batch):
        return {"recon": self.means[batch["y"]]}

    def encode(self, batch):
        return batch["x"].flatten(1)

    def sample(self, n, labels, guidance, steps, generator):
        return self.means[labels] + 0.002 * torch.randn(n, *self.means.shape[1:], generator=generator)


def test_sample_cli_rebuilds_the_run_model_and_writes_grid_and_npz(tmp_path, capsys):
    cfg = compose_cfg(["data=synthetic", "eval=none"], tmp_path)
    cfg.model = OmegaConf.create({"_target_": "tests.test_generation_eval.ClassMeans", "num_classes": 4})
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    raw, ema = torch.zeros(4, 1, 28, 28), torch.linspace(-0.9, 0.9, 4).view(4, 1, 1, 1).expand(4, 1, 28, 28)
    torch.save({"state_dict": {"model.means": raw}, "callbacks": {"EMA": {"decay": 0.9, "shadow": {"means": ema}}}},
               run / "checkpoints" / "last.ckpt")
    path = sample_main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "n=6", "labels=1,3", "steps=3", "guidance=2"])
    assert path == run / "samples" / "samples.npz" and str(path) in capsys.readouterr().out
    data = np.load(path)
    assert data["images"].shape == (6, 28, 28, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 3, 1, 3, 1, 3] and float(data["guidance"]) == 2.0
    expect = np.round((ema[[1, 3, 1, 3, 1, 3], 0, 0, 0].numpy() + 1) / 2 * 255)  # the EMA weights were used
    assert np.abs(data["images"][:, 0, 0, 0].astype(float) - expect).max() <= 3
    assert (run / "samples" / "samples.png").is_file()
    raw_path = sample_main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "n=2", "ema=false", f"out={tmp_path / 'r'}"])
    assert np.abs(np.load(raw_path)["images"].astype(float) - 127.5).max() <= 3  # raw weights: zeros → grey
    with pytest.raises(SystemExit, match=r"labels='9'.*\[0, 3\]"):
        sample_main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "labels=9"])
    with pytest.raises(SystemExit, match="n='x' is not an integer"):
        sample_main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "n=x"])
    with pytest.raises(SystemExit, match="no such checkpoint"):
        sample_main([f"ckpt={tmp_path / 'nope.ckpt'}"])
