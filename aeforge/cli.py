"""Hydra entry point. Imports nothing heavy at module level so `--cfg job` and `--help` stay fast."""

from __future__ import annotations

import functools
import os
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ASSETS = Path(__file__).parent / "data" / "assets"
RUN_DIR_ENV = "AEFORGE_RUN_DIR"  # set by rank 0 so DDP workers reuse its run dir


def _stamp() -> str:
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")[:-3]


def _latest(base: Path, pattern: str) -> Path | None:
    hits = sorted(base.glob(pattern), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def run_dir(base: str, resume) -> str:
    """Directory of a single run: a new timestamped one, or with resume=auto the latest that has a
    last checkpoint for this experiment."""
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    root = Path(base) / "runs"
    if str(resume) == "auto":
        last = _latest(root, "*/checkpoints/last.ckpt")
        if last is not None:
            return str(last.parent.parent)
    return str(root / _stamp())


@functools.cache  # resolved once per process: every job of the sweep must share it
def sweep_dir(base: str, resume) -> str:
    """Directory of a multirun; resume=auto continues the latest sweep of this experiment."""
    root = Path(base) / "multiruns"
    if str(resume) == "auto":
        last = _latest(root, "*/*/checkpoints/last.ckpt")
        if last is not None:
            return str(last.parent.parent.parent)
    return str(root / _stamp())


def register_resolvers() -> None:
    for name, fn in {
        "aeforge_run_dir": run_dir,
        "aeforge_sweep_dir": sweep_dir,
        "asset": lambda name: str(ASSETS / name),
        "cwd": lambda: os.getcwd(),
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


@hydra.main(version_base="1.3", config_path="pkg://aeforge.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from aeforge.train import run  # heavy imports (torch, lightning) only once a job runs

    return run(cfg)


if __name__ == "__main__":
    main()
