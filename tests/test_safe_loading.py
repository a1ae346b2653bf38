"""Checkpoints are data, never code: a real run's checkpoint carrying a pickle payload is refused, with an error
naming the file, by resume=auto, by evaluation (aeforge-eval / scripts/evaluate.py) and by model.pretrained,
and the payload never runs (aeforge/checkpoints.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from aeforge.checkpoints import SAFE_GLOBALS, CheckpointError, UnsafeCheckpointError, load_checkpoint
from aeforge.train import run
from tests.conftest import compose_cfg


class Payload:
    """Unpickling this opens (creates) `marker`: any code a pickle names runs as it is read."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real (smoke) run of the default experiment: its run dir, with checkpoints/last.ckpt."""
    out = tmp_path_factory.mktemp("run")
    run(compose_cfg(["debug=smoke", "evaluate=false"], out))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    return out


def poisoned_copy(real_run: Path, dest: Path) -> tuple[Path, Path]:
    """The run dir copied to `dest`, its last.ckpt carrying a Payload; (run dir, marker path)."""
    shutil.copytree(real_run, dest)
    ckpt = dest / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    marker = dest / "PAYLOAD_RAN"
    state["callbacks"]["extra"] = Payload(marker)
    torch.save(state, ckpt)
    return dest, marker


def test_the_payload_is_live(real_run, tmp_path):
    """The test's premise: reading the poisoned file the old way (weights_only=False) runs the payload."""
    run_dir, marker = poisoned_copy(real_run, tmp_path / "run")
    torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert marker.exists()


def test_resume_auto_refuses_a_payload(real_run, tmp_path):
    run_dir, marker = poisoned_copy(real_run, tmp_path / "run")
    cfg = compose_cfg(["debug=smoke", "evaluate=false", "resume=auto", "trainer.max_steps=6"], run_dir)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to read checkpoint {run_dir}/checkpoints/last.ckpt.*"
                                                    r"io.open.*weights_only=True"):
        run(cfg)
    # the file is checked before anything is built; Lightning's own read of it is safe as well
    from aeforge.callbacks import AtomicCheckpointIO

    with pytest.raises(UnsafeCheckpointError, match="refused to read checkpoint"):
        AtomicCheckpointIO().load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert not marker.exists()


def test_evaluation_refuses_a_payload(real_run, tmp_path):
    from aeforge import evaluate

    run_dir, marker = poisoned_copy(real_run, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit, match=rf"evaluate: refused to read checkpoint {ckpt}.*could run code"):
        evaluate.main([f"ckpt={ckpt}", "eval=default", "model=ae", "data=mnist_subset", "debug=smoke"])
    assert not marker.exists()


def test_pretrained_refuses_a_payload(real_run, tmp_path):
    from aeforge.models.fmae_iat import IATClassifier

    run_dir, marker = poisoned_copy(real_run, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to read checkpoint {ckpt}"):
        IATClassifier((1, 16, 16), num_classes=3, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                      pretrained=str(ckpt))
    # as a run builds it, from model.pretrained= (the recipe that fine-tunes from a checkpoint)
    cfg = compose_cfg(["experiment=fmae_iat_finetune", "debug=smoke", f"model.pretrained={ckpt}"], tmp_path)
    with pytest.raises(ValueError, match=rf"refused to read checkpoint {ckpt}"):
        run(cfg)
    assert not marker.exists()


def test_real_checkpoints_need_no_extra_globals(real_run):
    """Our own checkpoints hold tensors and plain containers only (SAFE_GLOBALS documents what was checked)."""
    state = load_checkpoint(real_run / "checkpoints" / "last.ckpt")
    assert {"state_dict", "optimizer_states", "rng", "loops"} <= state.keys()
    assert SAFE_GLOBALS == []
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint(real_run / "absent.ckpt")
    assert issubclass(UnsafeCheckpointError, CheckpointError)
