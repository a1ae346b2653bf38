"""A run without its data stops at once, before torch is imported or a model is built, with one message that
says where aeforge looked and how to give it the data (aeforge/data/sources.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from aeforge.config import CONF_DIR, group_choices
from aeforge.data.sources import DataFileError, check_data_config
from tests.conftest import ROOT, compose_cfg

NO_IMAGENET = {"HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}


def _headline(tmp_path, extra_env: dict) -> subprocess.CompletedProcess:
    """`python train.py model=cae data=imagenet` as a new user runs it, reporting afterwards what was imported."""
    code = ("import sys; sys.argv = ['train.py', 'model=cae', 'data=imagenet']\n"
            "from aeforge import cli\ntry:\n    cli.main()\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('TORCH', 'torch' in sys.modules, 'aeforge.models.cae' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "AEFORGE_LOG_DIR": str(tmp_path / "logs"), **extra_env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_headline_command_without_imagenet_fails_before_building_anything(tmp_path):
    proc = _headline(tmp_path, NO_IMAGENET)
    out = proc.stdout + proc.stderr
    assert "EXIT aeforge: DataFileError" in out
    # where it looked, and the three ways to give it data
    for text in ("ILSVRC/imagenet-1k", "IMAGENET_DIR is not set", "not in the local Hugging Face cache",
                 "IMAGENET_DIR=<local copy>", "data.path=", "logged-in Hugging Face account", "data.streaming=true",
                 "README.md, section Data"):
        assert text in out, text
    assert "Traceback" not in out
    # the order: neither torch nor the model's module was imported, so no model was built
    assert out.strip().endswith("TORCH False False")


def test_hub_check_makes_one_request_and_no_retries(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def no_network(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        raise ConnectionError("no network here")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataFileError, match="the hub did not give it"):
        check_data_config(OmegaConf.create({"path": "ILSVRC/imagenet-1k", "path_env": "IMAGENET_DIR"}))
    assert len(calls) == 1 and calls[0][1] is not None and calls[0][1] <= 5

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFileError, match="the hub is off"):
        check_data_config(OmegaConf.create({"path": "ILSVRC/imagenet-1k"}))
    assert len(calls) == 1, "offline: no request at all"


def test_gated_set_without_account_is_refused(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    gated = type("Info", (), {"gated": "auto"})
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id, **kw: gated)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(DataFileError, match="gated and no Hugging Face account is logged in"):
        check_data_config(OmegaConf.create({"path": "ILSVRC/imagenet-1k"}))


def _data_choices_with_files() -> list[str]:
    names = []
    for name in group_choices("data"):
        node = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
        path = str(node._get_node("path")._value()) if "path" in node else ""
        # a recipe whose staged files serve only smoke runs (webvid) names its own variable otherwise
        if "${paths.data_dir}" in path and "if_smoke" not in path:
            names.append(name)
    return names


@pytest.mark.parametrize("choice", _data_choices_with_files())
def test_every_file_backed_data_choice_names_its_variable(choice, tmp_path, monkeypatch):
    monkeypatch.setenv("AEFORGE_DATA_DIR", str(tmp_path / "nowhere"))
    cfg = compose_cfg([f"data={choice}"], tmp_path)
    with pytest.raises(DataFileError) as err:
        check_data_config(cfg.data)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "AEFORGE_DATA_DIR" in msg and "data.path=" in msg
    assert "README.md, section Data" in msg


def test_local_imagenet_folder_that_is_missing(tmp_path):
    with pytest.raises(DataFileError, match=r"data not found: .*absent \(IMAGENET_DIR"):
        check_data_config(OmegaConf.create({"path": str(tmp_path / "absent"), "path_env": "IMAGENET_DIR"}))
