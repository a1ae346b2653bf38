"""Checkpoint writes under faults: last.ckpt at every save point (best.ckpt of the same step shares its file), a
full disk mid-write (ENOSPC), NaN/Inf in the loss and in the gradients (module.nonfinite=stop|skip). Short
in-process runs of the default tiny config: debug=smoke over 3 epochs of 3 steps, a checkpoint per epoch."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from aeforge.callbacks.checkpointing import CheckpointWriteError
from aeforge.modules.base import NonFiniteLossError
from aeforge.train import run
from tests.conftest import compose_cfg

COMMON = ["debug=smoke", "trainer.max_steps=-1", "trainer.max_epochs=3", "evaluate=false"]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_last_ckpt_is_the_last_step_when_val_loss_stops_improving(tmp_path):
    """Lightning 2.6 writes last.ckpt only beside a top-k save: with a metric that improves once (mode=max on a
    falling val/loss), last.ckpt stayed at step 3 of 9 and resume=auto redid two epochs. Also: best.ckpt, linked
    to last.ckpt at step 3, keeps step 3 when last.ckpt is rewritten (a new file through os.replace)."""
    run(compose_cfg([*COMMON, "callbacks.model_checkpoint.mode=max"], tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert _ckpt(ckpts / "last.ckpt")["global_step"] == 9
    assert _ckpt(ckpts / "best.ckpt")["global_step"] == 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temp files left


def test_best_and_last_of_the_same_step_are_one_file(tmp_path):
    """A step that improves val/loss writes best.ckpt once and makes last.ckpt a hard link to it (a ViT-B
    checkpoint with Adam state is ~1.9 GB, ~9 s per write); both load."""
    run(compose_cfg(COMMON, tmp_path))
    best, last = tmp_path / "checkpoints" / "best.ckpt", tmp_path / "checkpoints" / "last.ckpt"
    assert _ckpt(best)["global_step"] == _ckpt(last)["global_step"] == 9  # val/loss falls every epoch here
    assert os.stat(best).st_ino == os.stat(last).st_ino and os.stat(last).st_nlink == 2


def test_disk_full_mid_write_keeps_the_previous_checkpoint_and_resumes(tmp_path, caplog):
    """ENOSPC while writing the step-6 checkpoint: the run stops with an error naming the file, the step-3
    last.ckpt is intact, no temp file is left, and resume=auto continues from step 3 to the end."""
    cfg = compose_cfg([*COMMON, "+callbacks.full._target_=tests.helpers.FailWrite", "+callbacks.full.at_step=6"],
                      tmp_path)
    with pytest.raises(CheckpointWriteError) as info:
        run(cfg)
    assert info.value.errno == errno.ENOSPC
    ckpts = tmp_path / "checkpoints"
    assert f"could not write checkpoint {ckpts}/" in str(info.value) and "resume=auto" in str(info.value)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert _ckpt(ckpts / "last.ckpt")["global_step"] == 3
    with caplog.at_level("INFO", logger="aeforge"):
        run(compose_cfg([*COMMON, "resume=auto"], tmp_path))
    assert "resume=auto: continuing" in caplog.text
    assert _ckpt(ckpts / "last.ckpt")["global_step"] == 9


@pytest.mark.parametrize("where, value", [("loss", "nan"), ("grad", "inf")])
def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path, where, value):
    cfg = compose_cfg([*COMMON, "+callbacks.bad._target_=tests.helpers.NonFiniteAt", "+callbacks.bad.at_step=4",
                       f"+callbacks.bad.where={where}", f"+callbacks.bad.value={value}"], tmp_path)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite {'loss' if where == 'loss' else 'gradient'} at step 4"):
        run(cfg)
    ckpt = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nonfinite_skip_skips_the_update_and_finishes(tmp_path, caplog):
    """module.nonfinite=skip: a NaN loss at step 4 and an Inf gradient at step 7 each skip that update (Adam
    counts 7 updates in 9 steps); the run finishes with finite weights and reports the skips."""
    cfg = compose_cfg([*COMMON, "module.nonfinite=skip",
                       "+callbacks.bad._target_=tests.helpers.NonFiniteAt", "+callbacks.bad.at_step=4",
                       "+callbacks.bad2._target_=tests.helpers.NonFiniteAt", "+callbacks.bad2.at_step=7",
                       "+callbacks.bad2.where=grad", "+callbacks.bad2.value=inf"], tmp_path)
    with caplog.at_level("WARNING"):
        run(cfg)
    assert caplog.text.count("update skipped (module.nonfinite=skip)") == 2
    ckpt = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 9 and ckpt["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    adam = ckpt["optimizer_states"][0]["state"]
    assert {int(s["step"]) for s in adam.values()} == {7}
    assert json.loads((tmp_path / "metrics.json").read_text())["train/skipped_steps"] == 2


def test_metrics_json_write_is_all_or_nothing(tmp_path, monkeypatch):
    """metrics.json and stages.json (train.py) go through write_text_atomic: a disk error mid-write leaves the
    previous file whole and no temp file."""
    from aeforge.callbacks import checkpointing

    path = tmp_path / "metrics.json"
    checkpointing.write_text_atomic(path, json.dumps({"val/loss": 1.0}))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpointing.os, "fsync", full)
    with pytest.raises(OSError):
        checkpointing.write_text_atomic(path, json.dumps({"val/loss": 0.5, "knn/acc": 0.9}))
    assert json.loads(path.read_text()) == {"val/loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
