"""Hydra entry point. Imports nothing heavy at module level so `--cfg job` and `--help` stay fast."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ASSETS = Path(__file__).parent / "data" / "assets"
RUN_DIR_ENV = "AEFORGE_RUN_DIR"  # set by rank 0 so DDP workers reuse its run dir
SWEEP_DIR_ENV = "AEFORGE_SWEEP_DIR"  # set when a multirun resolves its folder, so all its jobs share it
METRICS_LINE = "metrics: "  # the last line a finished run prints, followed by the path of its metrics.json


def metrics_json_of(stdout: str) -> Path:
    """The metrics.json of a finished `train.py` run, from what it printed (scripts and tests that start runs)."""
    lines = [line for line in stdout.splitlines() if line.startswith(METRICS_LINE)]
    if not lines:
        raise ValueError(f"no '{METRICS_LINE}<path>' line in the run's output:\n{stdout[-2000:]}")
    return Path(lines[-1][len(METRICS_LINE):])


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


def sweep_dir(base: str, resume) -> str:
    """Directory of a multirun; resume=auto continues the latest sweep of this experiment. The launcher
    resolves it first; every job then shares that folder (the jobs' own task_name may differ, model=ae,vae),
    also in processes the launcher starts (submitit), which inherit it from the environment."""
    if os.environ.get(SWEEP_DIR_ENV):
        return os.environ[SWEEP_DIR_ENV]
    os.environ[SWEEP_DIR_ENV] = path = _new_sweep_dir(base, resume)
    return path


def _new_sweep_dir(base: str, resume) -> str:
    root = Path(base) / "multiruns"
    if str(resume) == "auto":
        last = _latest(root, "*/*/checkpoints/last.ckpt")
        if last is not None:
            return str(last.parent.parent.parent)
    return str(root / _stamp())


def hydra_choice(group: str, _root_) -> str:
    """The chosen config of `group` (e.g. model=ae -> "ae"). In a job Hydra's runtime holds the choices; when a
    multirun resolves its sweep dir no job runs yet, and the choices are only in the config's own hydra node."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group))
    hydra_node = _root_.get("hydra") if "hydra" in _root_ else None
    if hydra_node is None:
        raise ValueError("task_name needs Hydra's choices: set task_name=... when composing a config by hand")
    # a sweep over the group (model=ae,vae) names its folder for all of them: ae+vae
    for override in hydra_node.overrides.task:
        key, _, value = str(override).partition("=")
        if key == group:
            return value.replace(",", "+")
    return str(hydra_node.runtime.choices.get(group))


def native_bf16_precision(accelerator: str) -> str:
    """"bf16-mixed" where bf16 matrix products run natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX),
    else "32-true": elsewhere the CPU emulates bf16 and runs slower than fp32 (measured on an AVX2-only CPU: the
    SCGC-on-ACM test took 510 s in bf16-mixed vs 29 s in fp32)."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "32-true"
    cpu_native = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16-mixed" if cpu_native else "32-true"


def register_resolvers() -> None:
    for name, fn in {
        "aeforge_choice": hydra_choice,
        "aeforge_run_dir": run_dir,
        "aeforge_sweep_dir": sweep_dir,
        "asset": lambda name: str(ASSETS / name),
        # ${if_smoke:2,10}: 2 in a debug=smoke run, else 10 (e.g. a sweeper's trial count)
        "if_smoke": lambda small, full, _root_: small if _root_.get("smoke") else full,
        "cwd": lambda: os.getcwd(),
        # ${bf16_if_native:${trainer.accelerator}}: bf16-mixed where bf16 is fast, else 32-true
        "bf16_if_native": native_bf16_precision,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


@hydra.main(version_base="1.3", config_path="pkg://aeforge.conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from aeforge.checkpoints import CheckpointError, CheckpointWriteError
    from aeforge.config import ConfigError
    from aeforge.data.sources import DataFileError, check_data_config

    try:
        check_data_config(cfg.data)  # before torch and Lightning are imported: seconds, not a minute
        from aeforge.train import run  # heavy imports (torch, lightning) only once a job runs

        return run(cfg)
    except (ConfigError, DataFileError, CheckpointError, CheckpointWriteError) as e:
        # the input or the disk is at fault, not the code: one message, no traceback (HYDRA_FULL_ERROR=1 shows it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"aeforge: {type(e).__name__}: {e}") from None


def main() -> float | None:
    """`aeforge-train` / `python train.py`: Hydra's entry, after the overrides Hydra itself reports badly."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

    from aeforge.config import ConfigError, check_overrides

    try:
        check_overrides(get_args_parser().parse_known_args()[0].overrides)
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"aeforge: {type(e).__name__}: {e}") from None
    return _main()


if __name__ == "__main__":
    main()
