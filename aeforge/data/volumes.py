"""3-D volumes (LDAE, card 7): a folder of NIfTI / npz volumes with a labels CSV, or synthetic "brains".

Batches are dicts: `x` (B, 1, D, H, W) uint8 on the wire (or float32 with `wire_dtype=float32`), normalised on
the device by `on_after_batch_transfer` ((x / 255 - mean) / std); `y` (B,) class index; `factor` (B,) float, a
continuous variable (age) when the source has one (NaN where the CSV leaves it empty).

Sources (`source`):
- "folder": `path` holds the volumes; `labels_csv` (default `<path>/labels.csv`) lists them, one row per
  volume: `file` (relative to `path`; .nii, .nii.gz or .npz with the array `npz_key`), `label` (int or a
  class name; names are sorted into indices), optionally the factor column. Every volume is resized
  (trilinear) to `volume_shape` and min-max scaled to [0, 1] once, when read. A missing, unreadable or
  corrupt file stops with one error naming it (at construction when `preload`, else at its first read).
- "synthetic": `synthetic_volumes`: ellipsoid "brains" whose ventricle size depends on a binary label and
  a continuous age, and whose brain shrinks with age (atrophy); deterministic by `seed_data`.

Splits: a fixed seeded permutation; `val_fraction` and `test_fraction` of it are held out (card: 0.5 % and
10 %; at least one volume each).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from aeforge.data.loading import ResumableLoader, _identity
from aeforge.data.sources import DataFileError, load_npz, missing_file

SOURCES = ("folder", "synthetic")
WIRE_DTYPES = ("uint8", "float32")
SUFFIXES = (".nii", ".nii.gz", ".npz")


def _smooth_field(rng: np.random.Generator, n: int, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """(n, D, H, W) low-frequency noise in [-1, 1]: a coarse random grid, trilinearly upsampled."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 1, cells, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[:, 0].numpy()


def synthetic_volumes(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n synthetic T1-like "brains", a pure function of (n, shape, seed): (x (n, 1, D, H, W) uint8, label (n,)
    int64, age (n,) float32 in years, U(55, 90)). The label enlarges the ventricles by half; age enlarges
    them too (x1.6 across the range) and shrinks the brain by 10 % (atrophy), so neither is a single-feature
    read-out of ventricle size. Nuisances: brain size and position, tissue contrast, smooth bias field, noise."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in shape), indexing="ij")
    label = rng.integers(0, 2, n).astype(np.int64)
    age = rng.uniform(55, 90, n).astype(np.float32)
    a = (age - 55) / 35
    col = lambda v: np.asarray(v, dtype=np.float32)[:, None, None, None]  # noqa: E731  (per volume)
    centre = [col(rng.uniform(-0.05, 0.05, n)) for _ in range(3)]
    size = col((1 - 0.1 * a) * rng.uniform(0.93, 1.07, n))
    axes = (0.8, 0.88, 0.72)
    r = np.sqrt(sum(((g - c) / (s * size)) ** 2 for g, c, s in zip((zz, yy, xx), centre, axes)))
    brain = r < 1
    wm, gm = col(rng.uniform(0.7, 0.8, n)), col(rng.uniform(0.45, 0.55, n))
    img = np.where(brain, wm, 0.0)
    img = np.where(brain & (r > 0.8), gm, img)  # grey-matter rim
    vent = col((1 + 0.5 * label) * (1 + 0.6 * a) * rng.uniform(0.92, 1.08, n))
    for side in (-1.0, 1.0):  # two ventricles beside the midline
        rv = np.sqrt(((zz - centre[0]) / (0.13 * vent)) ** 2 + ((yy - centre[1]) / (0.22 * vent)) ** 2
                     + ((xx - centre[2] - side * 0.12) / (0.07 * vent)) ** 2)
        img = np.where(brain & (rv < 1), 0.15, img)
    bias = 0.05 * _smooth_field(rng, n, (d, h, w), 4)
    img = np.where(brain, img + bias + 0.02 * rng.standard_normal((n, d, h, w), dtype=np.float32), 0.0)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)[:, None], label, age


def read_volume(path: Path, npz_key: str = "x") -> np.ndarray:
    """One volume file as float32 (D, H, W); any failure is a DataFileError naming the file."""
    if not path.is_file():
        raise DataFileError(f"volume file not found: {path} (listed in the labels CSV)")
    name = path.name.lower()
    try:
        if name.endswith(".npz"):
            arr = np.asarray(load_npz(path, (npz_key,))[npz_key], dtype=np.float32)
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
        else:
            raise DataFileError(f"volume file {path}: unknown type; use one of {list(SUFFIXES)}")
    except DataFileError:
        raise
    except Exception as e:  # nibabel, gzip and zlib raise many kinds for a damaged file
        raise DataFileError(f"volume file {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    while arr.ndim > 3 and arr.shape[-1] == 1:  # (X, Y, Z, 1) NIfTI
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataFileError(f"volume file {path} holds an array of shape {arr.shape}; expected a 3-D volume")
    if not np.isfinite(arr).all():
        raise DataFileError(f"volume file {path} holds NaN or Inf voxels")
    return arr


def prepare_volume(arr: np.ndarray, shape: tuple[int, int, int], wire_dtype: str) -> torch.Tensor:
    """Resize (trilinear) to `shape`, min-max scale to [0, 1], and put on the wire: (1, D, H, W)."""
    t = torch.from_numpy(arr)[None, None]
    if tuple(t.shape[2:]) != tuple(shape):
        t = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    return (t * 255).round().to(torch.uint8)[0] if wire_dtype == "uint8" else t[0].float()


class VolumeDataset(torch.utils.data.Dataset):
    """In memory (`x` a tensor) or read lazily from `files`; `y` and `factor` always in memory."""

    def __init__(self, y, factor, x=None, files=None, shape=None, wire_dtype="uint8", npz_key="x"):
        self.x, self.files, self.y, self.factor = x, files, y, factor
        self.shape, self.wire_dtype, self.npz_key = shape, wire_dtype, npz_key

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        if self.x is not None:
            x = self.x[i]
        else:
            x = torch.stack([prepare_volume(read_volume(self.files[j], self.npz_key), self.shape, self.wire_dtype)
                             for j in idx])
        return {"x": x, "y": self.y[i], "factor": self.factor[i]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class VolumeDataModule(pl.LightningDataModule):
    modality = "volume"

    def __init__(
        self,
        source: str = "synthetic",
        path: str | None = None,
        labels_csv: str | None = None,
        file_column: str = "file",
        label_column: str = "label",
        factor_column: str | None = "age",
        npz_key: str = "x",
        volume_shape: list[int] = (32, 32, 32),
        num_volumes: int = 512,
        seed_data: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        preload: bool = True,
        wire_dtype: str = "uint8",
        batch_size: int = 8,
        num_workers: int = 0,
        mean: list[float] = (0.0,),
        std: list[float] = (1.0,),
        seed: int = 0,
        path_env: str = "AEFORGE_DATA_DIR",
    ):
        super().__init__()
        self.path_env = path_env
        if source not in SOURCES:
            raise DataFileError(f"data.source={source!r} is not a volume source; choose one of {list(SOURCES)}")
        if wire_dtype not in WIRE_DTYPES:
            raise DataFileError(f"data.wire_dtype={wire_dtype!r}; choose one of {list(WIRE_DTYPES)}")
        if len(volume_shape) != 3 or min(volume_shape) < 1:
            raise DataFileError(f"data.volume_shape={list(volume_shape)} must be [D, H, W] of positive sizes")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataFileError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be "
                                f"in (0, 1) with a sum below 1")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.source, self.path, self.wire_dtype = source, path, wire_dtype
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)
        shape = tuple(int(s) for s in volume_shape)
        self.input_shape = (1, *shape)
        self.class_names: list[str] | None = None
        if source == "synthetic":
            x, y, factor = synthetic_volumes(num_volumes, shape, seed_data)
            x = torch.from_numpy(x) if wire_dtype == "uint8" else torch.from_numpy(x).float() / 255
            data = dict(x=x, y=torch.from_numpy(y), factor=torch.from_numpy(factor))
        else:
            data = self._read_folder(path, labels_csv, file_column, label_column, factor_column, npz_key, shape,
                                     preload)
        n = len(data["y"])
        n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
        if n - n_val - n_test < 1:
            raise DataFileError(f"{n} volumes are too few for val_fraction={val_fraction}, "
                                f"test_fraction={test_fraction}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        sets = {}
        for split, idx in parts.items():
            i = torch.as_tensor(idx)
            files = [data["files"][j] for j in idx] if "files" in data else None
            sets[split] = VolumeDataset(data["y"][i], data["factor"][i], x=data["x"][i] if "x" in data else None,
                                        files=files, shape=shape, wire_dtype=wire_dtype, npz_key=npz_key)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        self.num_classes = int(data["y"].max()) + 1

    def _read_folder(self, path, labels_csv, file_column, label_column, factor_column, npz_key, shape, preload):
        if not path:
            raise DataFileError("data.source=folder needs data.path=<folder of .nii/.nii.gz/.npz volumes>")
        root = Path(path).expanduser()
        if not root.exists():
            raise missing_file(root, self.path_env)
        if not root.is_dir():
            raise DataFileError(f"data.path={path}: not a folder (a folder of volumes with a labels CSV)")
        csv_path = Path(labels_csv).expanduser() if labels_csv else root / "labels.csv"
        if not csv_path.is_file():
            raise DataFileError(f"labels CSV not found: {csv_path} (data.labels_csv; columns {file_column}, "
                                f"{label_column}[, {factor_column}])")
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise DataFileError(f"labels CSV {csv_path} has no rows")
        need = [c for c in (file_column, label_column) + ((factor_column,) if factor_column else ()) if c]
        missing = [c for c in need if c not in rows[0]]
        if missing:
            raise DataFileError(f"labels CSV {csv_path} lacks the column(s) {missing}; it has {list(rows[0])}")
        files = [root / r[file_column] for r in rows]
        for row_no, p in enumerate(files, start=2):
            if not p.is_file():
                raise DataFileError(f"volume file not found: {p} (labels CSV {csv_path}, line {row_no})")
        raw = [r[label_column].strip() for r in rows]
        if all(v.lstrip("-").isdigit() for v in raw):
            y = torch.tensor([int(v) for v in raw])
            if int(y.min()) < 0:
                raise DataFileError(f"labels CSV {csv_path}: integer labels must be >= 0")
        else:
            self.class_names = sorted(set(raw))
            y = torch.tensor([self.class_names.index(v) for v in raw])
        try:
            factor = torch.tensor([float(r[factor_column]) if factor_column and r[factor_column].strip() else
                                   float("nan") for r in rows], dtype=torch.float32)
        except ValueError as e:
            raise DataFileError(f"labels CSV {csv_path}: column {factor_column!r} must be numbers ({e})") from None
        out = {"y": y, "factor": factor}
        if preload:
            out["x"] = torch.stack([prepare_volume(read_volume(p, npz_key), shape, self.wire_dtype) for p in files])
        else:
            out["files"] = files
        return out

    # -- the device side ------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        batch["x"] = self.normalize(batch["x"])
        return batch

    def device_batch(self, batch: dict, device: torch.device, augment: bool = False) -> dict[str, torch.Tensor]:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["x"] = self.normalize(batch["x"])
        return batch

    # -- loaders ---------------------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool) -> ResumableLoader:
        return ResumableLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, seed=self.seed,
                               num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)

    def eval_dataloader(self, split: str, batch_size: int) -> torch.utils.data.DataLoader:
        """Unshuffled loader of train, val or test for evaluators."""
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        if split not in sets:
            raise ValueError(f"{type(self).__name__} has splits {list(sets)}; got {split!r}")
        return torch.utils.data.DataLoader(sets[split], batch_size=batch_size, num_workers=self.num_workers,
                                           collate_fn=_identity)

    def describe(self) -> str:
        src = self.path if self.source == "folder" else "synthetic"
        return (f"{type(self).__name__}({src}: volumes {self.input_shape}, {len(self.train_set)} train, "
                f"{len(self.val_set)} val, {len(self.test_set)} test, {self.num_classes} classes)")
