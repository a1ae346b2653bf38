"""Hugging Face image datasets: ImageNet and any hub/local `datasets` source, decoded in the loader workers (or
on the accelerator with decode_on_device), uint8 on the wire; streamed shard by shard with exact resume."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from aeforge.data.images import ImageDataModule
from aeforge.data.loading import StreamLoader
from aeforge.data.sources import DataFileError, check_local_or_hub

log = logging.getLogger("aeforge")
# what PIL raises for an image that does not decode: UnidentifiedImageError and "image file is truncated" are
# OSErrors, some plugins raise SyntaxError on a broken header
BAD_IMAGE = (OSError, SyntaxError)

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
        path_env: str = "AEFORGE_DATA_DIR",
        max_bad_images: int = 100,
        **kwargs,
    ):
        """streaming: read shards as they are iterated (hub or local) instead of materialising the split;
        shuffle_buffer: rows in the streamed shuffle buffer; train_rows: size of the streamed train split
        when the dataset's metadata does not give it (needed for epoch-based schedules); path_env: the
        environment variable the config reads `path` from, named when the data cannot be found; max_bad_images:
        images that do not decode are skipped (replaced by the next row) and counted (metrics.json:
        data/bad_images); one more than this stops the run (not yet for streamed or decode_on_device data)."""
        super().__init__(**kwargs)
        if max_bad_images < 0:
            raise ValueError(f"data.max_bad_images must be >= 0, got {max_bad_images}")
        self.max_bad_images = max_bad_images
        self.bad_rows: set[tuple[str, int]] = set()  # (split, row): counted once however often it is met
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
        # here, not in setup(): a run without its data stops before the model is built, without hub retries
        check_local_or_hub(path, path_env)

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
                for fmt in ("parquet", "arrow"):  # arrow: raw shards as `datasets` caches them (stream format)
                    files = {s: sorted(str(f) for f in p.rglob(f"*{s}*.{fmt}")) for s in self.splits}
                    if all(files.values()):
                        return _load_shards(datasets, fmt, files, stream)
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
        def make(k: int, train: bool):
            if self.decode_on_device:
                return _HFEncodedImages(ds[self.splits[k]], self, train)
            return _HFImages(ds[self.splits[k]], self, k, train)

        self.train_set, self.val_set = make(0, train=True), make(1, train=False)
        # the train split as evaluators see it: resize + centre crop, no flip (features, probes)
        self.train_eval_set = make(0, train=False)

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

    def count_bad_rows(self, batch: dict) -> dict:
        """Take the loaders' report of skipped rows out of the batch (workers are other processes, so the count
        travels with the data) and stop the run once more than max_bad_images rows did not decode."""
        rows = batch.pop("bad_row", None)
        if rows is None:
            return batch
        for split, i in rows.tolist():
            if split >= 0 and (self.splits[split], i) not in self.bad_rows:
                self.bad_rows.add((self.splits[split], i))
                log.warning("skipped an image that does not decode: %s row %d of data.path=%s (%d so far, "
                            "data.max_bad_images=%d)", self.splits[split], i, self.path, len(self.bad_rows),
                            self.max_bad_images)
        if len(self.bad_rows) > self.max_bad_images:
            shown = ", ".join(f"{s} row {i}" for s, i in sorted(self.bad_rows)[:10])
            raise DataFileError(
                f"{len(self.bad_rows)} images in data.path={self.path} do not decode ({shown}), more than "
                f"data.max_bad_images={self.max_bad_images}: the shards are damaged. Re-create or re-download "
                f"them, or raise data.max_bad_images to skip more")
        return batch

    def data_metrics(self) -> dict[str, float]:
        """Numbers about the data itself for metrics.json (aeforge/train.py reads them after the run)."""
        return {"data/bad_images": len(self.bad_rows)}

    def state_dict(self) -> dict:
        return {"bad_rows": [[s, i] for s, i in sorted(self.bad_rows)]}  # a resumed run keeps counting

    def load_state_dict(self, state: dict) -> None:
        self.bad_rows = {(str(s), int(i)) for s, i in state.get("bad_rows", [])}

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        batch = self.count_bad_rows(batch)
        if "jpeg" in batch:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            batch = decode_batch(batch, self.image_size, device)
        return batch

    def device_batch(self, batch: dict, device: torch.device, augment: bool = False) -> dict[str, torch.Tensor]:
        batch = self.count_bad_rows(batch)
        if "jpeg" in batch:  # decode_on_device: decode where the evaluator runs
            batch = decode_batch(batch, self.image_size, device)
        return super().device_batch(batch, device, augment)



def _load_shards(datasets, fmt: str, files: dict[str, list[str]], stream: dict):
    """load_dataset over local parquet/arrow shards; a shard that cannot be read is named in the error (the
    `datasets` exception often names none)."""
    import pyarrow as pa

    try:
        return datasets.load_dataset(fmt, data_files=files, **stream)
    except (pa.ArrowException, datasets.exceptions.DatasetGenerationError, OSError, ValueError) as e:
        bad = [f for split in files.values() for f in split if not _shard_readable(f, fmt)]
        which = f"corrupt or truncated shard(s) {bad}" if bad else f"the {fmt} shards {sorted(files.values())}"
        raise DataFileError(f"could not read {which}: {type(e).__name__}: {str(e)[:300]}. Re-create or "
                            f"re-download the shard(s)") from e


def _shard_readable(path: str, fmt: str) -> bool:
    """Whether the shard's footer/schema reads: cheap (no data pages), catches truncated and foreign files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            pq.ParquetFile(path).metadata  # noqa: B018  (reading the footer is the check)
        else:
            with pa.memory_map(path) as f:
                pa.ipc.open_stream(f).read_all()
        return True
    except (pa.ArrowException, OSError, ValueError):
        return False


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
    """Decoded rows. A row whose image does not decode is replaced by the next one that does (the batch keeps
    its size) and reported in "bad_row" = (split index, row), [-1, -1] for a good row, for the DataModule to
    count in the main process."""

    def __init__(self, ds, dm: HFImageDataModule, split: int, train: bool):
        self.ds, self.decode, self.split = ds, _RowDecoder(dm, train), split
        self.where, self.max_bad = f"{dm.splits[split]} split of data.path={dm.path}", dm.max_bad_images

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i, bad = int(i), torch.tensor([-1, -1])
        # past max_bad_images + 1 bad rows in a row the run fails anyway: stop searching there
        for j in range(i, i + min(len(self.ds), self.max_bad + 2)):
            try:
                item = self.decode(self.ds[j % len(self.ds)])
            except BAD_IMAGE as e:
                if j == i:
                    bad = torch.tensor([self.split, i])
                    log.warning("row %d of the %s does not decode (%s: %s); using the next row", i, self.where,
                                type(e).__name__, e)
                continue
            return {**item, "bad_row": bad}
        raise DataFileError(f"rows {i}.. of the {self.where} do not decode: more than data.max_bad_images="
                            f"{self.max_bad} in a row; the shards are damaged")


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
