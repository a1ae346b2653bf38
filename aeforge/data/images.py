"""Image DataModules. Images travel as uint8 (B, C, H, W); `on_after_batch_transfer` converts, normalises
and augments them on the accelerator, so the input path keeps up with a GPU.

- ArrayImageDataModule: `.npz` arrays (x, y[, x_test, y_test]), e.g. the MNIST subset shipped in the package.
- HFImageDataModule: Hugging Face `datasets` (hub name, local imagefolder/parquet/arrow, save_to_disk dir).
- SyntheticImageDataModule: class templates + noise, for tests and benchmarks.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from aeforge.data.loading import ResumableLoader, StreamLoader, _identity


class DataFileError(RuntimeError):
    """A data file is missing, unreadable or lacks the expected arrays."""


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) + int labels; `__getitems__` fetches a whole batch in one indexing op."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        out = {"x": self.x[i]}
        if self.y is not None:
            out["y"] = self.y[i]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def random_resized_crop_flip(
    x: torch.Tensor, scale: tuple[float, float] | None, hflip: bool, ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """Per-sample RandomResizedCrop (torchvision's sampling rule, one try + centre fallback) and horizontal
    flip for a float batch on any device, as one batched `grid_sample` (bilinear)."""
    b, _, h, w = x.shape
    dev = x.device
    if scale is not None:
        area = torch.empty(b, device=dev).uniform_(*scale)
        logr = torch.empty(b, device=dev).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])))
        r = logr.exp()
        cw = (area * r).sqrt().clamp(max=1.0)  # crop width / image width
        ch = (area / r).sqrt().clamp(max=1.0)
        cx = torch.rand(b, device=dev) * (1 - cw) + cw / 2  # centre in [0, 1]
        cy = torch.rand(b, device=dev) * (1 - ch) + ch / 2
    else:
        cw = ch = torch.ones(b, device=dev)
        cx = cy = torch.full((b,), 0.5, device=dev)
    sx = cw.clone()
    if hflip:
        sx = torch.where(torch.rand(b, device=dev) < 0.5, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx * 2 - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy * 2 - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class ImageDataModule(pl.LightningDataModule):
    """Shared behaviour: uint8 batches in, normalised float batches out (augmented while training)."""

    modality = "image"
    gpu_augment = True  # crop/flip on the accelerator (HF images do it while decoding instead)

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        mean: list[float],
        std: list[float],
        random_resized_crop: list[float] | None = None,
        hflip: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.crop_scale = tuple(random_resized_crop) if random_resized_crop else None
        self.hflip = hflip
        self.input_shape: tuple[int, int, int] | None = None
        self.num_classes: int | None = None
        self.train_set = self.val_set = None

    # -- the device side ------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if augment and self.gpu_augment and (self.crop_scale or self.hflip):
            x = random_resized_crop_flip(x, self.crop_scale, self.hflip)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        training = self.trainer is not None and self.trainer.training
        batch["x"] = self.normalize(batch["x"], augment=training)
        return batch

    def device_batch(self, batch: dict, device: torch.device, augment: bool = False) -> dict[str, torch.Tensor]:
        """A batch of one of our loaders, outside Lightning (evaluators): on `device`, normalised."""
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["x"] = self.normalize(batch["x"], augment=augment)
        return batch

    # -- loaders ---------------------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool, batch_size: int | None = None) -> ResumableLoader:
        return ResumableLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def eval_dataloader(self, split: str, batch_size: int) -> torch.utils.data.DataLoader:
        """Un-augmented, unshuffled, unsharded loader for evaluators (features of `split`)."""
        dataset = {"train": self.train_set, "val": self.val_set}[split]
        batched = hasattr(dataset, "__getitems__")
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=_identity if batched else None,
        )

    def describe(self) -> str:
        return f"{type(self).__name__}(image {self.input_shape}, {self.num_classes} classes)"


def load_npz(path: str | os.PathLike, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """np.load with errors that name the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(
            f"data file not found: {p}. Set data.path=... or AEFORGE_DATA_DIR (datasets are read from "
            f"$AEFORGE_DATA_DIR/<name>/...; see docs/configs.md)"
        )
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataFileError(f"data file {p} is corrupt or not an .npz archive ({type(e).__name__}: {e})") from e
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataFileError(f"data file {p} lacks arrays {missing}; it has {sorted(arrays)}")
    return arrays


def _as_nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:  # (N, H, W) grey
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):  # NHWC
        t = t.permute(0, 3, 1, 2).contiguous()
    if t.dtype != torch.uint8:
        raise DataFileError(f"images must be uint8, got {t.dtype}")
    return t


class ArrayImageDataModule(ImageDataModule):
    """Images from an .npz with `x`, `y` and optionally `x_test`, `y_test`. Without a test part,
    `val_fraction` of the training images (a fixed, seeded split) is held out."""

    def __init__(self, path: str, val_fraction: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.path, self.val_fraction = path, val_fraction
        self._peek()

    def _peek(self) -> None:
        arrays = load_npz(self.path, ("x", "y"))
        x, y = _as_nchw(arrays["x"]), torch.from_numpy(arrays["y"].astype(np.int64))
        if "x_test" in arrays and self.val_fraction == 0:
            xv, yv = _as_nchw(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64))
        else:
            if not 0 < self.val_fraction < 1:
                raise DataFileError(f"{self.path} has no x_test; set data.val_fraction in (0, 1) to hold out images")
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
            n_val = int(len(x) * self.val_fraction)
            xv, yv, x, y = x[perm[:n_val]], y[perm[:n_val]], x[perm[n_val:]], y[perm[n_val:]]
        if x.shape[1] != self.mean.shape[1]:
            raise DataFileError(
                f"{self.path} has {x.shape[1]}-channel images but data.mean/std give {self.mean.shape[1]} channels"
            )
        self.train_set, self.val_set = TensorImageDataset(x, y), TensorImageDataset(xv, yv)
        self.input_shape = tuple(x.shape[1:])
        self.num_classes = int(max(y.max(), yv.max())) + 1


class SyntheticImageDataModule(ImageDataModule):
    """Each class is a fixed random smooth template; samples are template + Gaussian noise (uint8)."""

    def __init__(
        self,
        num_train: int,
        num_val: int,
        num_classes: int,
        channels: int,
        image_size: int,
        noise: float = 0.25,
        **kwargs,
    ):
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(0)
        low = torch.rand(num_classes, channels, max(image_size // 4, 1), max(image_size // 4, 1), generator=g)
        templates = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)

        def make(n: int) -> TensorImageDataset:
            y = torch.randint(num_classes, (n,), generator=g)
            x = templates[y] + noise * torch.randn(n, channels, image_size, image_size, generator=g)
            return TensorImageDataset((x.clamp(0, 1) * 255).round().to(torch.uint8), y)

        self.train_set, self.val_set = make(num_train), make(num_val)
        self.input_shape, self.num_classes = (channels, image_size, image_size), num_classes


class HFImageDataModule(ImageDataModule):
    """Images from Hugging Face `datasets`: a hub name (`ILSVRC/imagenet-1k`), a local folder of
    parquet/arrow shards or images (imagefolder), or a `save_to_disk` directory.

    Decoding and the random-resized-crop run in the DataLoader workers (images differ in size);
    evaluation images are resized (shorter side to image_size / 0.875) and centre-cropped. Batches
    leave the workers as uint8 and are normalised on the accelerator.

    decode_on_device: workers only read the JPEG header and draw the crop box; the bytes are decoded
    (nvJPEG on a GPU, batched) and cropped/resized on the accelerator, so JPEG decoding no longer needs
    a CPU core per few hundred images/s. JPEG sources only."""

    gpu_augment = False

    def __init__(
        self,
        path: str,
        image_size: int,
        num_classes: int,
        name: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        image_key: str = "image",
        label_key: str = "label",
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        train_rows: int | None = None,
        decode_on_device: bool = False,
        **kwargs,
    ):
        """streaming: read shards as they are iterated (hub or local) instead of materialising the split;
        shuffle_buffer: rows in the streamed shuffle buffer; train_rows: size of the streamed train split
        when the dataset's metadata does not give it (needed for epoch-based schedules)."""
        super().__init__(**kwargs)
        self.decode_on_device = decode_on_device
        if streaming and decode_on_device:
            raise ValueError("data.streaming=true and data.decode_on_device=true cannot be combined yet; "
                             "set one of them to false")
        self.streaming, self.shuffle_buffer, self.train_rows = streaming, shuffle_buffer, train_rows
        self.path, self.name = path, name
        self.splits = (train_split, val_split)
        self.image_key, self.label_key = image_key, label_key
        self.image_size, self.num_classes = image_size, num_classes
        self.input_shape = (len(self.mean.view(-1)), image_size, image_size)

    def _load(self):
        import datasets

        p = Path(self.path)
        stream = {"streaming": True} if self.streaming else {}
        try:
            if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
                ds = datasets.load_from_disk(str(p))
                if not self.streaming:
                    return ds
                shards = {k: v.to_iterable_dataset(num_shards=min(64, max(len(v), 1))) for k, v in ds.items()}
                return datasets.IterableDatasetDict(shards)
            if p.is_dir():
                files = {s: sorted(str(f) for f in p.rglob(f"*{s}*.parquet")) for s in self.splits}
                if all(files.values()):
                    return datasets.load_dataset("parquet", data_files=files, **stream)
                return datasets.load_dataset("imagefolder", data_dir=str(p), **stream)
            return datasets.load_dataset(self.path, self.name, **stream)
        except FileNotFoundError as e:
            raise DataFileError(f"could not load dataset from data.path={self.path!r}: {e}") from e

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ds = self._load()
        missing = [s for s in self.splits if s not in ds]
        if missing:
            raise DataFileError(
                f"dataset {self.path} has splits {list(ds)}, not {missing} (data.train_split/val_split)"
            )
        if self.streaming:
            self.train_set = _HFStream(ds[self.splits[0]], self, train=True, rows=self._rows(ds, self.splits[0]))
            self.val_set = _HFStream(ds[self.splits[1]], self, train=False, rows=self._rows(ds, self.splits[1]))
            return
        cls = _HFEncodedImages if self.decode_on_device else _HFImages
        self.train_set = cls(ds[self.splits[0]], self, train=True)
        self.val_set = cls(ds[self.splits[1]], self, train=False)
        # the train split as evaluators see it: resize + centre crop, no flip (features, probes)
        self.train_eval_set = cls(ds[self.splits[0]], self, train=False)

    def _rows(self, ds, split: str) -> int | None:
        if split == self.splits[0] and self.train_rows:
            return int(self.train_rows)
        splits = getattr(ds[split].info, "splits", None) or {}
        info = splits.get(split) if hasattr(splits, "get") else None
        return int(info.num_examples) if info is not None and info.num_examples else None

    def _loader(self, dataset, shuffle: bool, batch_size: int | None = None):
        if self.streaming:
            return StreamLoader(dataset, batch_size=batch_size or self.batch_size, num_workers=self.num_workers,
                                pin_memory=torch.cuda.is_available())
        loader = super()._loader(dataset, shuffle, batch_size)
        if self.decode_on_device:
            loader.collate_fn = collate_encoded
        return loader

    def eval_dataloader(self, split: str, batch_size: int):
        if self.streaming:  # un-augmented, ordered pass over the split (the train stream shuffles)
            rows = self.train_set.rows if split == "train" else self.val_set.rows
            stream = _HFStream(self.train_set.ds if split == "train" else self.val_set.ds, self, False, rows)
            return StreamLoader(stream, batch_size=batch_size, num_workers=self.num_workers)
        dataset = self.train_eval_set if split == "train" else self.val_set
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                           collate_fn=collate_encoded if self.decode_on_device else None)

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        if "jpeg" in batch:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            batch = decode_batch(batch, self.image_size, device)
        return batch

    def device_batch(self, batch: dict, device: torch.device, augment: bool = False) -> dict[str, torch.Tensor]:
        if "jpeg" in batch:  # decode_on_device: decode where the evaluator runs
            batch = decode_batch(batch, self.image_size, device)
        return super().device_batch(batch, device, augment)



def collate_encoded(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad JPEG byte strings into one (B, max_len) uint8 tensor (+ lengths, crop boxes, flips, labels)."""
    lengths = torch.tensor([len(it["jpeg"]) for it in items])
    buf = torch.zeros(len(items), int(lengths.max()), dtype=torch.uint8)
    for i, it in enumerate(items):
        buf[i, : lengths[i]] = it["jpeg"]
    out = {"jpeg": buf, "jpeg_len": lengths}
    for key in ("box", "flip", "y"):
        out[key] = torch.stack([it[key] for it in items])
    return out


def decode_batch(batch: dict, size: int, device: torch.device) -> dict:
    """Decode a padded JPEG batch on `device` (nvJPEG on CUDA), crop each image to its box, resize to
    size x size (bilinear, antialiased), flip, and return uint8 (B, 3, size, size) as batch["x"]."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [batch["jpeg"][i, : batch["jpeg_len"][i]] for i in range(len(batch["jpeg_len"]))]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    out = []
    for img, (top, left, h, w), flip in zip(images, batch["box"].tolist(), batch["flip"].tolist()):
        crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(crop.flip(-1) if flip else crop)
    x = torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)
    rest = {k: v for k, v in batch.items() if k not in ("jpeg", "jpeg_len", "box", "flip")}
    return {"x": x, **rest}


class _RowDecoder:
    """One HF row -> {"x": uint8 (C, size, size), "y"}: decode, random-resized-crop (train) or resize +
    centre-crop (eval), flip. Accepts decoded PIL images and undecoded {"bytes", "path"} cells."""

    def __init__(self, dm: HFImageDataModule, train: bool):
        from torchvision.transforms import v2

        self.image_key, self.label_key = dm.image_key, dm.label_key
        size = dm.image_size
        if train and dm.crop_scale:
            geom = [v2.RandomResizedCrop(size, scale=dm.crop_scale, interpolation=v2.InterpolationMode.BICUBIC)]
        else:
            geom = [v2.Resize(int(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(size)]
        self.mode = "RGB" if len(dm.mean.view(-1)) == 3 else "L"
        self.transform = v2.Compose([v2.PILToTensor(), *geom])
        self.hflip = train and dm.hflip

    def __call__(self, row: dict) -> dict[str, torch.Tensor]:
        img = row[self.image_key]
        if isinstance(img, dict):
            import io

            from PIL import Image

            img = Image.open(io.BytesIO(img["bytes"]) if img.get("bytes") is not None else img["path"])
        x = self.transform(img.convert(self.mode))
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x, "y": torch.tensor(int(row[self.label_key]))}


class _HFImages(torch.utils.data.Dataset):
    def __init__(self, ds, dm: HFImageDataModule, train: bool):
        self.ds, self.decode = ds, _RowDecoder(dm, train)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.decode(self.ds[int(i)])


class _HFStream(torch.utils.data.IterableDataset):
    """A streamed split (`data.streaming=true`): shards are split over ranks (split_dataset_by_node) and,
    inside each loader worker, over workers (datasets does that itself); training rows pass a seeded
    shuffle buffer re-drawn per epoch. Images stay undecoded until after the resume skip, so resuming
    mid-epoch only re-reads the skipped rows' bytes. Each item names its worker for StreamLoader."""

    def __init__(self, ds, dm: HFImageDataModule, train: bool, rows: int | None):
        import datasets

        self.ds = ds.cast_column(dm.image_key, datasets.Image(decode=False))
        self.decode = _RowDecoder(dm, train)
        self.train, self.seed, self.buffer = train, dm.seed, dm.shuffle_buffer
        self.rows = rows
        self.epoch, self.skip = 0, {}

    def __len__(self) -> int:
        if self.rows is None:
            raise TypeError("streamed split of unknown size")  # DataLoader/Lightning then treat it as unsized
        from aeforge.data.loading import _rank_world

        return -(-self.rows // _rank_world()[1])

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        from aeforge.data.loading import _rank_world

        rank, world = _rank_world()
        ds = split_dataset_by_node(self.ds, rank, world) if world > 1 else self.ds
        if self.train:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        skip, held = self.skip.get(worker, 0), None
        # one row of look-ahead so the worker's last row can carry the "last" flag StreamLoader needs
        for j, row in enumerate(ds):
            if j < skip:
                continue
            if held is not None:
                yield self._item(held, worker, last=False)
            held = row
        if held is not None:
            yield self._item(held, worker, last=True)
        else:  # nothing (left) for this worker: tell the loader it is done
            c = 3 if self.decode.mode == "RGB" else 1
            yield {"x": torch.zeros(c, 1, 1, dtype=torch.uint8), "y": torch.tensor(-1), "worker": torch.tensor(worker),
                   "last": torch.tensor(True), "empty": torch.tensor(True)}

    def _item(self, row: dict, worker: int, last: bool) -> dict[str, torch.Tensor]:
        return {**self.decode(row), "worker": torch.tensor(worker), "last": torch.tensor(last),
                "empty": torch.tensor(False)}


class _HFEncodedImages(torch.utils.data.Dataset):
    """Raw JPEG bytes + the crop box drawn from the header alone (no pixel decoding in the worker)."""

    def __init__(self, ds, dm: HFImageDataModule, train: bool):
        import datasets

        self.ds = ds.cast_column(dm.image_key, datasets.Image(decode=False))
        self.image_key, self.label_key = dm.image_key, dm.label_key
        self.scale = dm.crop_scale if train else None
        self.hflip = train and dm.hflip

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import io

        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        row = self.ds[int(i)]
        data = row[self.image_key]["bytes"]
        if data is None:
            data = Path(row[self.image_key]["path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG":
                raise DataFileError(f"data.decode_on_device needs JPEG images; row {i} is {img.format}")
            w, h = img.size
        if self.scale:
            box = RandomResizedCrop.get_params(torch.empty(1, h, w), list(self.scale), [3 / 4, 4 / 3])
        else:  # centre crop of 0.875 of the shorter side = resize to size/0.875 then centre-crop size
            side = int(min(h, w) * 0.875)
            box = ((h - side) // 2, (w - side) // 2, side, side)
        return {
            "jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "box": torch.tensor(box),
            "flip": torch.tensor(bool(self.hflip and torch.rand(()) < 0.5)),
            "y": torch.tensor(int(row[self.label_key])),
        }
