"""Shared test helpers: compose configs in-process, run train.py in a subprocess, locate staged data."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from aeforge.compose import compose_config

# the repository root is on sys.path through pytest's `pythonpath` (pyproject.toml), so configs can point
# _target_ at tests.helpers
ROOT = Path(__file__).resolve().parents[1]

# Larger real datasets: AEFORGE_DATA_DIR, else the ../shared/data checkout beside the repo (CI has it).
_shared = ROOT.parent / "shared" / "data"
DATA_DIR = Path(os.environ.get("AEFORGE_DATA_DIR", _shared))
if DATA_DIR.is_dir():
    os.environ.setdefault("AEFORGE_DATA_DIR", str(DATA_DIR))


def needs_data(*parts: str):
    path = DATA_DIR.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"needs staged data {path} (set AEFORGE_DATA_DIR)")


def compose_cfg(overrides: list[str], tmp_path: Path | None = None):
    """Compose the full config as train.py would, with run paths pointed at tmp_path."""
    cfg = compose_config(overrides, output_dir=tmp_path or Path("/tmp/aeforge-test"), task_name="test")
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


def load_script(name: str):
    """A module of scripts/ (not a package), imported by file path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train(args: list[str], log_dir: Path, timeout: int = 600, env: dict | None = None, check: bool = True):
    """`python train.py args` with runs under log_dir; returns the CompletedProcess."""
    return run_command([sys.executable, str(ROOT / "train.py"), *args], log_dir, timeout, env, check)


def run_command(cmd: list[str], log_dir: Path, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Any aeforge command (train.py, scripts/..., under torchrun) in the repo root, runs under log_dir."""
    # a process group started in this pytest process (in-process DDP runs) leaves MASTER_PORT etc. behind,
    # still bound by its store: a child must pick its own
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                 "AEFORGE_RUN_DIR", "AEFORGE_SWEEP_DIR"}
    full_env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    full_env.update({"AEFORGE_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"})
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        shown = " ".join(str(c) for c in cmd[1:])
        raise AssertionError(f"{shown} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def fast_args():
    """Overrides that shrink the default run to a few seconds."""
    return ["debug=smoke", "eval.max_samples=64"]


@pytest.fixture(scope="session")
def hf_imagenet_layout(tmp_path_factory) -> Path:
    """A tiny dataset in the Hugging Face ImageNet-1k parquet layout (image + label, train/validation)."""
    import datasets
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("validation", 8)):
        sizes = [(int(rng.integers(40, 80)), 64, 3) for _ in range(n)]
        imgs = [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in sizes]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
        ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(n)]}, features=features)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root.parent
