"""Broken files are one clear error naming the file: a truncated or bit-flipped checkpoint (resume=<file>,
resume=auto, evaluation), a corrupt parquet shard, an .npz without the expected arrays. Images that do not
decode inside a good shard are skipped and counted (metrics.json: data/bad_images) up to data.max_bad_images.
Raw .arrow shards load like parquet ones."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aeforge.checkpoints import CheckpointError
from aeforge.data.sources import DataFileError
from aeforge.train import build, run
from tests.conftest import compose_cfg

HF = ["experiment=mae_mnist", "debug=smoke", "data=imagenet", "data.image_size=16", "evaluate=false"]


@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory) -> Path:
    """A real (smoke) run whose last.ckpt was cut to half its size, as a copy interrupted mid-transfer."""
    out = tmp_path_factory.mktemp("run")
    run(compose_cfg(["debug=smoke", "evaluate=false"], out))
    last = out / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) * 2 // 3] ^= 0xFF  # inside a tensor's bytes: torch.load alone would not notice
    (out / "flipped.ckpt").write_bytes(bytes(flipped))
    last.write_bytes(data[: len(data) // 2])
    return out


def test_truncated_checkpoint_stops_resume_and_evaluation(truncated_run, tmp_path):
    from aeforge import evaluate

    last = truncated_run / "checkpoints" / "last.ckpt"
    named = rf"checkpoint {last} is truncated or corrupt \(\d+ bytes"
    with pytest.raises(CheckpointError, match=rf"resume=auto: {named}"):
        run(compose_cfg(["debug=smoke", "evaluate=false", "resume=auto"], truncated_run))
    with pytest.raises(CheckpointError, match=rf"resume={last}: {named}"):
        run(compose_cfg(["debug=smoke", "evaluate=false", f"resume={last}"], tmp_path))
    with pytest.raises(SystemExit, match=rf"evaluate: resume={last}: {named}"):
        evaluate.main([f"ckpt={last}", "eval=default", "model=ae", "data=mnist_subset", "debug=smoke"])
    assert not list(tmp_path.glob("checkpoints/*.ckpt")), "the refused resume wrote nothing"
    flipped = truncated_run / "flipped.ckpt"
    with pytest.raises(CheckpointError, match=rf"resume={flipped}: checkpoint {flipped} is truncated or corrupt "
                                              r".*fails its CRC check"):
        run(compose_cfg(["debug=smoke", "evaluate=false", f"resume={flipped}"], tmp_path))


def test_corrupt_parquet_shard_is_named(hf_imagenet_layout, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(hf_imagenet_layout, root)
    shard = next(root.rglob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])  # cut off the footer, as a download that stopped early
    dm = build(compose_cfg([*HF, f"data.path={root}"], tmp_path).data, seed=0)
    with pytest.raises(DataFileError, match=rf"corrupt or truncated shard\(s\) \['{shard}'\]"):
        dm.setup("fit")


def jpeg(rng, h: int = 40, w: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_with_bad_jpegs(tmp_path_factory) -> Path:
    """A parquet ImageNet layout whose train shard holds 2 undecodable images among 8 (rows 1 and 5): random
    bytes, and a JPEG cut in half."""
    import datasets

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("badjpeg")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    for split, n in (("train", 8), ("validation", 4)):
        images = [{"bytes": jpeg(rng), "path": None} for _ in range(n)]
        if split == "train":
            images[1]["bytes"] = rng.integers(0, 255, 500, dtype=np.uint8).tobytes()
            images[5]["bytes"] = images[5]["bytes"][: len(images[5]["bytes"]) // 2]
        ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


def test_undecodable_images_are_skipped_counted_and_limited(shard_with_bad_jpegs, tmp_path, caplog):
    # 2 batches of 4 visit all 8 train rows: both bad ones are replaced, counted once each, reported
    common = [*HF, f"data.path={shard_with_bad_jpegs}", "trainer.limit_train_batches=2", "trainer.max_steps=2"]
    with caplog.at_level("WARNING", logger="aeforge"):
        run(compose_cfg([*common, "data.max_bad_images=2"], tmp_path / "ok"))
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["data/bad_images"] == 2 and metrics["steps"] == 2
    assert "train row 1 of data.path=" in caplog.text and "(2 so far, data.max_bad_images=2)" in caplog.text
    # one more than allowed: the run stops, naming the data and the rows
    with pytest.raises(DataFileError, match=rf"2 images in data.path={shard_with_bad_jpegs} do not decode "
                                            r"\(train row 1, train row 5\), more than data.max_bad_images=1"):
        run(compose_cfg([*common, "data.max_bad_images=1"], tmp_path / "fail"))


def test_npz_without_the_expected_arrays_is_named(tmp_path):
    path = tmp_path / "digits.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    cfg = compose_cfg(["data=mnist", f"data.path={path}"], tmp_path)
    with pytest.raises(DataFileError, match=rf"data file {path} lacks arrays \['x', 'y'\]; it has \['images', "
                                            r"'labels'\]"):
        build(cfg.data, seed=0)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataFileError, match=rf"data file {path} is corrupt or not an .npz archive"):
        build(cfg.data, seed=0)


def test_raw_arrow_shards_load_like_parquet(hf_imagenet_layout, tmp_path):
    """`datasets`' own shard files (Arrow stream format, as in its cache or a save_to_disk folder) in a plain
    folder: the README's data.path promise."""
    import datasets

    root = tmp_path / "arrow"
    root.mkdir()
    for split in ("train", "validation"):
        ds = datasets.load_dataset("parquet", data_files=[str(next(hf_imagenet_layout.rglob(f"{split}-*")))],
                                   split="train")
        ds.save_to_disk(str(tmp_path / split))
        shutil.copy(next((tmp_path / split).glob("*.arrow")), root / f"imagenet-1k-{split}-00000-of-00001.arrow")
    dm = build(compose_cfg([*HF, f"data.path={root}"], tmp_path).data, seed=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (24, 8)
    assert dm.train_set[0]["x"].shape == (3, 16, 16)
