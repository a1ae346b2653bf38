"""Image data path: uint8 batches, device-side normalisation/augmentation, HF datasets, resumable loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.cli import ASSETS
from aeforge.data.hf_images import HFImageDataModule
from aeforge.data.images import ArrayImageDataModule, random_resized_crop_flip
from aeforge.data.loading import ResumableLoader, ShardedSampler


def mnist(**kw):
    return ArrayImageDataModule(path=str(ASSETS / "mnist_subset.npz"), batch_size=32, num_workers=0,
                                mean=[0.1307], std=[0.3081], **kw)


def test_shipped_mnist_subset_is_real_and_uint8():
    dm = mnist()
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    assert len(dm.train_set) == 10000 and len(dm.val_set) == 2000
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape == (32, 1, 28, 28)
    assert torch.bincount(dm.train_set.y).min() > 800  # every digit present


def test_normalize_denormalize_roundtrip():
    dm = mnist()
    x = dm.train_set.x[:8]
    z = dm.normalize(x)
    assert abs(z.mean().item()) < 0.5
    assert torch.allclose(dm.denormalize(z), x.float() / 255, atol=1e-6)


def test_device_augmentation_crop_and_flip():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    torch.manual_seed(0)
    out = random_resized_crop_flip(x, scale=None, hflip=True)
    flipped = torch.isclose(out, x.flip(-1)).all(dim=(1, 2, 3))
    same = torch.isclose(out, x).all(dim=(1, 2, 3))
    assert (flipped | same).all() and 10 < flipped.sum() < 54  # each sample either flipped or not, ~half
    crop = random_resized_crop_flip(torch.rand(8, 3, 32, 32), scale=(0.2, 1.0), hflip=False)
    assert crop.shape == (8, 3, 32, 32) and torch.isfinite(crop).all()


def test_val_split_from_train_when_no_test_part(tmp_path):
    p = tmp_path / "imgs.npz"
    np.savez(p, x=np.random.randint(0, 255, (100, 8, 8, 3), dtype=np.uint8), y=np.arange(100) % 5)
    dm = ArrayImageDataModule(path=str(p), batch_size=10, num_workers=0, mean=[0.5] * 3, std=[0.2] * 3,
                              val_fraction=0.2)
    assert dm.input_shape == (3, 8, 8) and len(dm.train_set) == 80 and len(dm.val_set) == 20


def test_resumable_loader_continues_at_exact_batch():
    ds = mnist().train_set
    full = ResumableLoader(ds, batch_size=100, shuffle=True, seed=3)
    it = iter(full)
    for _ in range(3):
        next(it)
    state = full.state_dict()
    rest = [b["y"] for b in it]
    resumed = ResumableLoader(ds, batch_size=100, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    again = [b["y"] for b in resumed]
    assert state == {"epoch": 0, "batches": 3} and len(again) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(again, rest))
    # the next epoch is a new permutation, identical for both loaders
    assert torch.equal(next(iter(full))["y"], next(iter(resumed))["y"])


def test_sharded_sampler_partitions_ranks():
    shards = []
    for rank in range(3):
        s = ShardedSampler(10, shuffle=True, seed=0)
        s.rank, s.world = rank, 3
        shards.append(s.indices())
    assert all(len(s) == 4 for s in shards)
    assert set().union(*map(set, shards)) == set(range(10))


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            d = tmp_path / split / label
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.random.randint(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path


def hf(path, **kw):
    kw = {"num_workers": 0, **kw}
    return HFImageDataModule(path=str(path), image_size=16, num_classes=2, batch_size=4,
                             mean=[0.5] * 3, std=[0.25] * 3, random_resized_crop=[0.5, 1.0], hflip=True, **kw)


def test_hf_imagefolder_local(image_folder):
    dm = hf(image_folder)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape == (4, 3, 16, 16)
    assert set(batch["y"].tolist()) <= {0, 1}
    assert dm.eval_dataloader("val", 6).dataset is dm.val_set


def test_hf_save_to_disk_and_missing_split(image_folder, tmp_path):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(image_folder))
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = hf(tmp_path / "saved")
    dm.setup("fit")
    assert dm.train_set[0]["x"].shape == (3, 16, 16)
    from aeforge.data.images import DataFileError

    with pytest.raises(DataFileError, match=r"has splits \['train', 'validation'\], not \['test'\]"):
        hf(tmp_path / "saved", val_split="test").setup("fit")


@pytest.fixture
def jpeg_parquet(tmp_path):
    import io

    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    for split in ("train", "validation"):
        rows = []
        for i in range(6):  # smooth images so that resampling differences stay small
            img = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, np.full_like(xx, 40 * i)], -1).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            rows.append({"bytes": buf.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": rows, "label": list(rng.integers(0, 3, 6))}, features=features)
        ds.to_parquet(str(tmp_path / f"{split}-00000-of-00001.parquet"))
    return tmp_path


def test_decode_on_device_matches_worker_decoding(jpeg_parquet):
    """The device path (decode + crop + resize after the loader) gives the same eval images as PIL in workers."""
    cpu, dev = hf(jpeg_parquet), hf(jpeg_parquet, decode_on_device=True)
    cpu.setup("fit")
    dev.setup("fit")
    a = next(iter(cpu.eval_dataloader("val", 6)))
    b = dev.on_before_batch_transfer(next(iter(dev.eval_dataloader("val", 6))))
    assert b["x"].dtype == torch.uint8 and b["x"].shape == a["x"].shape == (6, 3, 16, 16)
    assert torch.equal(a["y"], b["y"])
    diff = (a["x"].float() - b["x"].float()).abs().mean()
    assert diff < 4  # of 255 (measured 1.6): bicubic in PIL vs bilinear + antialias here
    train = dev.on_before_batch_transfer(next(iter(dev.train_dataloader())))
    assert train["x"].shape == (4, 3, 16, 16) and set(train) == {"x", "y"}


def test_evaluators_read_decode_on_device_data_unaugmented(jpeg_parquet):
    """Evaluators used to get raw JPEG batches (no "x") from a decode_on_device DataModule, and the train
    split's random crops: features now come decoded, centre-cropped, the same on every pass."""
    from aeforge.eval import EvalContext

    class Pixels(torch.nn.Module):
        def encode(self, batch):
            return batch["x"].flatten(1)

    feats = {}
    for name, dm in (("cpu", hf(jpeg_parquet)), ("dev", hf(jpeg_parquet, decode_on_device=True))):
        dm.setup("fit")
        for split in ("train", "val"):
            first = EvalContext(Pixels(), dm, torch.device("cpu"), 4, None).features(split)
            again = EvalContext(Pixels(), dm, torch.device("cpu"), 4, None).features(split)
            assert first[0].shape == (6, 3 * 16 * 16) and len(first[1]) == 6
            assert torch.equal(first[0], again[0]), (name, split)  # no random crop or flip
            feats[name, split] = first
    for split in ("train", "val"):
        assert torch.equal(feats["cpu", split][1], feats["dev", split][1])
        # normalised by std 0.25: 4/255 of pixel difference (PIL bicubic vs bilinear here) is ~0.06
        assert (feats["cpu", split][0] - feats["dev", split][0]).abs().mean() < 0.1


@pytest.fixture
def sharded_parquet(tmp_path, monkeypatch):
    """4 train shards × 8 rows (label = row id, so the order of delivered rows is observable) + 1 val shard."""
    import datasets
    from PIL import Image

    # datasets sleeps 5 s whenever a parquet stream ends (an arrow thread-shutdown workaround); skip in tests
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for split, shards in (("train", 4), ("validation", 1)):
        for s in range(shards):
            ids = range(8 * s, 8 * s + 8)
            imgs = [Image.fromarray(np.full((12, 14, 3), i * 7 % 256, np.uint8)) for i in ids]
            ds = datasets.Dataset.from_dict({"image": imgs, "label": list(ids)}, features=features)
            ds.to_parquet(str(tmp_path / f"{split}-{s:05d}-of-{shards:05d}.parquet"))
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_epoch_covers_split_and_resumes_exactly(sharded_parquet, workers):
    """data.streaming=true: each epoch delivers every train row once, in a seeded order that changes per
    epoch; a loader restored from a mid-epoch state_dict delivers exactly the remaining batches."""
    def loader():
        dm = hf(sharded_parquet, streaming=True, shuffle_buffer=16, train_rows=32, num_workers=workers, seed=3)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    assert len(first) == 8
    epoch0 = [b["y"].tolist() for b in first]
    epoch1 = [b["y"].tolist() for b in first]
    assert all("worker" not in b for b in first)
    assert sorted(sum(epoch0, [])) == list(range(32)) == sorted(sum(epoch1, []))
    assert epoch0 != epoch1 and sum(epoch0, []) != list(range(32))  # shuffled, differently per epoch

    again = loader()
    it = iter(again)
    head = [next(it)["y"].tolist() for _ in range(3)]
    state = again.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b["y"].tolist() for b in resumed]
    assert head + tail == epoch0
    assert [b["y"].tolist() for b in resumed] == epoch1  # and the following epoch is the same as well


def test_streaming_eval_loader_and_bad_combination(sharded_parquet):
    dm = hf(sharded_parquet, streaming=True)
    dm.setup("fit")
    ys = torch.cat([b["y"] for b in dm.eval_dataloader("val", 3)])
    assert ys.tolist() == list(range(8))  # ordered, un-augmented, all rows
    with pytest.raises(ValueError, match="streaming=true and data.decode_on_device=true"):
        hf(sharded_parquet, streaming=True, decode_on_device=True)


def test_streaming_on_several_ranks_runs_equal_steps(sharded_parquet, monkeypatch):
    """Two ranks (faked) read disjoint rows and stop after the same number of batches, so DDP cannot hang
    at the epoch's end; without a known split size the loader refuses to guess."""
    import aeforge.data.loading as loading

    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(loading, "_rank_world", lambda rank=rank: (rank, 2))
        dm = hf(sharded_parquet, streaming=True, shuffle_buffer=8, train_rows=32)
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches = [b["y"].tolist() for b in loader]
        assert len(loader) == len(batches) == 3  # ⌈32 / 2 / 4⌉ − 1
        seen.append(set(sum(batches, [])))
    assert not seen[0] & seen[1]
    dm = hf(sharded_parquet, streaming=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match="data.train_rows"):
        next(iter(dm.train_dataloader()))
