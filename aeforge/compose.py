"""Compose a config outside `@hydra.main`, exactly as `train.py` would: the one helper that tests, proofs,
benchmarks and `aeforge-eval` share."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import aeforge.cli  # noqa: F401  (registers the ${asset:}, ${cwd:}, ... resolvers the configs use)


def compose_config(overrides: list[str] | tuple[str, ...] = (), *, output_dir: str | Path | None = None,
                   task_name: str | None = None, return_hydra_config: bool = False) -> DictConfig:
    """The composed root config with `overrides`. `output_dir` points the run (and its log dir) there;
    `task_name` replaces the default, which reads Hydra's runtime choices (only set inside a Hydra job)."""
    GlobalHydra.instance().clear()
    with initialize_config_module("aeforge.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
        if task_name is not None:
            cfg.task_name = task_name
    return cfg
