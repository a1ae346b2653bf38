"""End-to-end runs: the default run's artifacts, every experiment in smoke mode, resume, NaN guard, the smoke
strategy choice. DDP on CPU, multirun and Optuna sweeps run as the README shows them (tests/test_readme.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aeforge.config import group_choices
from aeforge.modules.base import NonFiniteLossError
from aeforge.train import build, model_inputs, run, validate
from tests.conftest import compose_cfg, run_train
from tests.test_readme import readme_commands


def test_default_run_artifacts(tmp_path):
    """`python train.py` (shrunk) leaves config, checkpoints, CSV metrics, image grid, loss curve, metrics.json."""
    proc = run_train(["trainer.max_epochs=2", "trainer.limit_train_batches=10", "eval.max_samples=256",
                      "eval.evaluators.linear_probe.epochs=5"], tmp_path)
    runs = list((tmp_path / "ae_mnist_subset" / "runs").iterdir())
    assert len(runs) == 1
    out = runs[0]
    for name in ("config_resolved.yaml", ".hydra/config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "csv/metrics.csv", "reconstructions.png", "loss_curve.png", "metrics.json", "train.log"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    keys = ("val/loss", "train/loss_epoch", "linear_probe/acc", "knn/acc", "reconstruction/psnr", "reconstruction/ssim")
    for key in keys:
        assert isinstance(metrics[key], float), key
    history = json.loads((out / "loss_history.json").read_text())
    assert len(history["train/loss_epoch"]) == 2 and len(history["val/loss"]) == 2  # one point per epoch
    assert metrics["knn/acc"] > 0.3  # 256 real digits, 20 steps: well above the 0.1 of chance
    assert proc.stdout.strip().splitlines()[-1] == f"metrics: {out / 'metrics.json'}"
    # the console as a new user sees it: progress bar, run dir, metrics table; no ads, no noise
    console = proc.stdout + proc.stderr
    assert "final metrics" in proc.stdout and "Epoch 1/1" in proc.stdout and f"run dir: {out}" in console
    for noise in ("💡", "Tip:", "Total FLOPs", "deprecated", "Deprecation"):
        assert noise not in console, noise


# GPU recipes with hundreds of millions of parameters: their one-step smoke run at full width costs 30-60 s of CPU
# and 8-16 GB (weights, gradients, Adam state), so it runs under `make bench`; `make test` builds each at full
# width and checks its size (millions of parameters as built under debug=smoke, random stand-ins for the frozen
# pretrained parts; FAE's stand-in DINOv2-g keeps 1 of its 40 blocks, docs/methods/fae.md)
FULL_SIZE_PARAMS_M = {"stepvideo_vae": 486.1, "videovae_plus": 143.7, "ldae_adni": 362.3, "ldae_adni_ddpm": 183.1,
                      "hi_vae_webvid": 534.9, "fae_dinov2_imagenet": 544.2, "rae_dinov2_imagenet": 501.6,
                      "rae_dit_dh_imagenet": 1339.7}


def _with_imagenet_layout(overrides: list[str], tmp_path, layout):
    cfg = compose_cfg(overrides, tmp_path)
    if "imagenet" in str(cfg.data.get("path", "")).lower() or cfg.data._target_.endswith("HFImageDataModule"):
        cfg = compose_cfg([*overrides, f"data.path={layout}"], tmp_path)
    return cfg


@pytest.mark.parametrize("experiment", sorted(FULL_SIZE_PARAMS_M))
def test_full_size_recipe_builds_at_full_width(experiment, tmp_path, hf_imagenet_layout):
    cfg = _with_imagenet_layout([f"experiment={experiment}", "debug=smoke"], tmp_path, hf_imagenet_layout)
    validate(cfg)
    datamodule = build(cfg.data, seed=0)
    model = build(cfg.model, **model_inputs(cfg.model, datamodule))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(FULL_SIZE_PARAMS_M[experiment], abs=0.1)


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.benchmark) if e in FULL_SIZE_PARAMS_M
                                        else e for e in group_choices("experiment")])
def test_experiment_smoke(experiment, tmp_path, hf_imagenet_layout):
    if f"python train.py experiment={experiment}" in readme_commands():
        pytest.skip("tests/test_readme.py runs it, as the README shows it")
    overrides = [f"experiment={experiment}", "debug=smoke"]
    if compose_cfg([f"experiment={experiment}"]).trainer.accelerator == "gpu":
        # a GPU recipe at full size (ViT-B, RAE's ViT-XL decoder, Step-Video's 486M VAE, ...): one optimiser step, no
        # validation pass, no GB-sized checkpoint; the README's full-size commands run the smoke recipe as it is,
        # validation and checkpoints included
        overrides += ["trainer.max_steps=1", "trainer.limit_val_batches=0", "callbacks.model_checkpoint=null",
                      "trainer.enable_checkpointing=false"]
    cfg = _with_imagenet_layout(overrides, tmp_path, hf_imagenet_layout)
    path = cfg.data.get("path")
    if path and not Path(str(path)).exists() and not str(path).startswith("ILSVRC"):
        pytest.skip(f"needs staged data {path} (set AEFORGE_DATA_DIR)")
    checkpoints = (cfg.get("callbacks") or {}).get("model_checkpoint") is not None
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] >= 1 and all(v == v for v in metrics.values())
    if checkpoints:
        last = tmp_path / "checkpoints" / "last.ckpt"
        assert last.is_file()
        last.unlink()  # free the disk now, before the next full-size recipe


def _last_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("source", ["arrays", "hf_stream"])
def test_resume_gives_identical_weights(tmp_path, source, hf_imagenet_layout):
    """6 steps straight == 3 steps, SIGTERM (checkpoint + stop), resume=auto, 3 more steps (mid-epoch);
    for in-memory arrays and for a streamed HF dataset (StreamLoader's resume)."""
    common = ["experiment=mae_mnist", "debug=smoke", "trainer.max_steps=6", "trainer.limit_train_batches=8",
              "trainer.max_epochs=1", "evaluate=false", "callbacks.model_checkpoint.monitor=null"]
    if source == "hf_stream":
        common += ["data=imagenet", f"data.path={hf_imagenet_layout}", "data.streaming=true", "data.train_rows=24",
                   "data.image_size=16", "data.batch_size=4", "data.shuffle_buffer=8"]
    run_train([*common, "task_name=straight"], tmp_path)
    proc = run_train([*common, "task_name=interrupted", "+callbacks.kill._target_=tests.helpers.SignalAtStep",
                      "+callbacks.kill.at_step=3"], tmp_path)
    assert "received SIGTERM" in proc.stderr + proc.stdout
    first = list((tmp_path / "interrupted" / "runs").iterdir())
    # the signal arrives after step 3; the checkpoint is written at the end of the step that sees it
    assert len(first) == 1 and 3 <= _last_weights(first[0])["global_step"] < 6
    run_train([*common, "task_name=interrupted", "resume=auto"], tmp_path)
    assert list((tmp_path / "interrupted" / "runs").iterdir()) == first  # continued in the same run dir

    straight = _last_weights(next((tmp_path / "straight" / "runs").iterdir()))
    resumed = _last_weights(first[0])
    assert straight["global_step"] == resumed["global_step"] == 6
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    cfg = compose_cfg(["debug=smoke", "trainer.max_steps=-1", "trainer.max_epochs=3", "trainer.limit_train_batches=3",
                       "+callbacks.nan._target_=tests.helpers.NaNAfter", "+callbacks.nan.at_step=4"], tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4 \(epoch 1\)"):
        run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_smoke_strategy_one_process_auto_several_kept_fsdp_falls_back(tmp_path, caplog):
    """debug=smoke used to reset trainer.strategy to auto always, so a 2-process trainer=ddp_sites smoke run
    silently became plain DDP; one process still gets auto (no process group to leak), FSDP on CPU too."""
    from aeforge.train import trainer_config

    def strategy(*overrides):
        return trainer_config(compose_cfg(["debug=smoke", *overrides], tmp_path)).strategy

    sites = strategy("trainer=ddp_sites", "trainer.devices=2")
    assert sites._target_ == "aeforge.strategies.SiteParallelStrategy"
    assert strategy("trainer=ddp", "trainer.devices=2")._target_ == "aeforge.strategies.TimeoutDDPStrategy"
    assert strategy("trainer=ddp") == strategy("trainer=ddp_sites") == "auto"  # one process
    with caplog.at_level("WARNING", logger="aeforge"):
        assert strategy("trainer=fsdp", "trainer.devices=2") == "auto"
    assert "FSDP needs a GPU" in caplog.text
    fsdp = compose_cfg(["debug=smoke", "trainer=fsdp"], tmp_path)
    trainer_config(fsdp)
    assert fsdp.trainer.strategy._target_.endswith("FSDPStrategy")  # the run's config is left as composed
    assert trainer_config(compose_cfg(["trainer=fsdp"], tmp_path)).strategy._target_.endswith("FSDPStrategy")
