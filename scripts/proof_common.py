"""Shared helpers for the CPU proofs (scripts/proof_*.py): compose a config exactly as train.py does, fit it
with a bare Lightning Trainer (no logger, checkpoints or pictures) and run evaluators on any model."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AEFORGE_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def compose(overrides: list[str]):
    import torch

    from aeforge.compose import compose_config

    # one thread: on a shared 2-core machine two contending threads ran ~20x slower per step
    torch.set_num_threads(int(os.environ.get("AEFORGE_PROOF_THREADS", "1")))
    cfg = compose_config(overrides, output_dir="/tmp/aeforge-proof")
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


def build_parts(cfg, datamodule=None):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from aeforge.train import model_inputs

    pl.seed_everything(cfg.seed, verbose=False)
    dm = datamodule if datamodule is not None else instantiate(cfg.data, seed=cfg.seed)
    model = instantiate(cfg.model, **model_inputs(cfg.model, dm))
    module = instantiate(cfg.module)(
        model=model,
        objective=instantiate(cfg.objective),
        optim=instantiate(cfg.optim),
        num_classes=dm.num_classes,
        feature_dim=None,
    )
    return dm, model, module


def fit(cfg, datamodule=None, callbacks: list | None = None):
    """Train cfg's model on cfg's data; returns (model, datamodule, seconds)."""
    dm, model, module = build_parts(cfg, datamodule)
    return model, dm, fit_module(cfg, module, dm, callbacks)


def fit_module(cfg, module, dm, callbacks: list | None = None) -> float:
    """Fit an already built module quietly on the CPU (no logger, checkpoints or validation; only the given
    callbacks); returns seconds."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=cfg.trainer.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        use_distributed_sampler=False,
        callbacks=callbacks or [],
    )
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    return time.time() - t0


def evaluate(model, dm, evaluators: dict, max_samples: int | None = None) -> dict[str, float]:
    import torch

    from aeforge.eval import Evaluation

    return Evaluation(evaluators, max_samples=max_samples, batch_size=256)(model, dm, torch.device("cpu"))
