"""Configs compose and validate; every bad input fails early with a message naming the key/choices."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from aeforge.config import ConfigError, check_compatibility, group_choices
from aeforge.data.images import DataFileError
from aeforge.train import validate
from tests.conftest import compose_cfg, run_train

EXPERIMENTS = group_choices("experiment")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    validate(cfg)


@pytest.mark.parametrize("model", group_choices("model"))
def test_every_model_config_validates(model):
    """Each model validates with the default data or, if it needs other data, with the first choice the
    mismatch error offers (so that message is tested for every non-image model too)."""
    try:
        validate(compose_cfg([f"model={model}"]))
    except ConfigError as e:
        match = re.search(r"Data choices for this model: \[(.*?)\]", str(e))
        assert match, str(e)
        first = match.group(1).split(",")[0].strip(" '")
        validate(compose_cfg([f"model={model}", f"data={first}"]))


def test_misspelt_key_names_key_and_valid_keys():
    cfg = compose_cfg(["+model.latent_dimm=3"])
    valid = r"valid keys: \['activation', 'hidden_dims', 'latent_dim'\]"
    with pytest.raises(ConfigError, match=r"model\.latent_dimm.*" + valid):
        validate(cfg)


def test_wrong_type_fails_before_compute():
    with pytest.raises(ConfigError, match=r"model\.latent_dim='abc' has the wrong type"):
        validate(compose_cfg(["model.latent_dim=abc"]))
    with pytest.raises(ConfigError, match=r"optim\.lr='fast'"):
        validate(compose_cfg(["optim.lr=fast"]))


def test_model_data_mismatch_names_both():
    cfg = compose_cfg([])
    with open_dict(cfg):
        cfg.model = {"_target_": "tests.helpers.GraphOnlyModel", "hidden": 4}
    with pytest.raises(ConfigError, match=r"needs graph data, but data=.*ArrayImageDataModule.*provides image data"):
        check_compatibility(cfg, {"model": "graph_only", "data": "mnist_subset"})


def test_unknown_group_choice_lists_valid_ones(tmp_path):
    proc = run_train(["model=nope"], tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "Could not find 'model/nope'" in err
    assert "Available options in 'model'" in err and "mae_vit_base" in err and "vae" in err


def test_unknown_key_on_command_line(tmp_path):
    proc = run_train(["trainer.max_epoch=3"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "max_epoch" in proc.stderr + proc.stdout


def test_missing_data_file_names_file(tmp_path):
    cfg = compose_cfg([f"data.path={tmp_path}/absent.npz"], tmp_path)
    from aeforge.train import run

    with pytest.raises(DataFileError, match=r"data not found: .*absent\.npz"):
        run(cfg)


def test_corrupt_data_file_names_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    from aeforge.data.images import ArrayImageDataModule

    with pytest.raises(DataFileError, match=r"broken\.npz is corrupt"):
        ArrayImageDataModule(path=str(bad), batch_size=2, num_workers=0, mean=[0.5], std=[0.5])
    wrong = tmp_path / "wrong_keys.npz"
    np.savez(wrong, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataFileError, match=r"lacks arrays \['x', 'y'\]; it has \['images'\]"):
        ArrayImageDataModule(path=str(wrong), batch_size=2, num_workers=0, mean=[0.5], std=[0.5])


def test_optim_needs_exactly_one_lr():
    from aeforge.train import build

    with pytest.raises(ValueError, match="exactly one of optim.lr"):
        build(compose_cfg(["optim.lr=null"]).optim)


def test_objective_that_does_not_fit_the_model_names_the_missing_output():
    """e.g. model=cae model.target=tokens with the pixel objective=cae: a clear error, not a bare KeyError."""
    import torch

    from aeforge.objectives import LossTerm, Objective

    class NeedsPred(LossTerm):
        def forward(self, outputs, batch):
            return outputs["pred"].sum()

    with pytest.raises(KeyError, match=r"term 'pixels' \(NeedsPred\) needs 'pred'.*outputs \['logits'\]"):
        Objective({"pixels": NeedsPred()})({"logits": torch.zeros(1)}, {"x": torch.zeros(1)})


def test_resume_path_must_exist(tmp_path):
    cfg = compose_cfg([f"resume={tmp_path}/nothing.ckpt"], tmp_path)
    from aeforge.train import run

    with pytest.raises(ConfigError, match="no such checkpoint file"):
        run(cfg)


def test_slurm_launcher_config_ships(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_train(["--cfg", "hydra", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"], tmp_path)
    assert "SlurmLauncher" in proc.stdout and "tasks_per_node: ${trainer.devices}" in proc.stdout


def test_cfg_job_composes_without_importing_torch():
    """`train.py --cfg job` stays fast because composing imports neither torch nor Lightning."""
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['train.py', '--cfg', 'job', 'experiment=mae_mnist']\n"
            "from aeforge import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, 'pytorch_lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "task_name: mae_mnist" in out and out.strip().endswith("TORCH False False")


def test_config_docs_are_current():
    """docs/configs.md is generated from the config tree; regenerate with scripts/gen_config_docs.py."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gen_config_docs.py"), "--check"])
    assert proc.returncode == 0, "docs/configs.md is stale: run python scripts/gen_config_docs.py"


def test_bf16_recipe_resolves_to_fp32_where_the_cpu_emulates_bf16(monkeypatch):
    """scgc_acm's precision is bf16-mixed only where bf16 runs natively: an AVX2-only CPU emulates it ~25x
    slower than fp32 (measured), a GPU or an AVX512-BF16/AMX CPU runs it faster."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert compose_cfg(["experiment=scgc_acm", "trainer.accelerator=cpu"]).trainer.precision == "32-true"
    assert compose_cfg(["experiment=scgc_acm", "trainer.accelerator=gpu"]).trainer.precision == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert compose_cfg(["experiment=scgc_acm", "trainer.accelerator=cpu"]).trainer.precision == "bf16-mixed"
