"""Tabular outlier-detection data (ADBench's classical sets and any npz / CSV / parquet table).

Protocol (ADBench, unsupervised setting, as APRE+MSS is evaluated there): the table is split once per seed into
a stratified 70 % train / 30 % test part (`test_fraction`, `split_seed`); the detector is fitted on the train
part *with its outliers in it and without labels*, and scored on the test part, whose `anomaly` labels are read
only by the evaluators. The feature scaling (z-score by default) is fitted on the train part only and applied to
both, so nothing about the test rows leaks into training. Batches: `x` (B, d) float32 (already scaled),
`anomaly` (B,) int64 1 = outlier, `idx` (B,) the row within its split.

A file is found from `name` (`<root>/<name>.npz`, root = $AEFORGE_DATA_DIR/adbench_classical) or given by
`path` (.npz with `x`/`y` — `X` is accepted too —, .csv or .parquet with a label column)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from aeforge.config import ConfigError
from aeforge.data.sources import DataFileError, load_npz, missing_file

log = logging.getLogger("aeforge")

SPLITS = ("train", "test")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): each class split in the same proportion (sklearn's stratified shuffle split).
    Rows stay in the split's shuffled order, so a capped evaluation (eval.max_samples) still sees both classes
    in files that list the outliers last."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    return train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=labels)


def fit_scaler(x: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) such that (x - shift) / scale is z-scored / min-max scaled on `x` (the train part);
    constant features get scale 1 (they carry no information and must not divide by zero)."""
    if scaling == "standard":
        shift, scale = x.mean(0), x.std(0)
    elif scaling == "minmax":
        shift, scale = x.min(0), x.max(0) - x.min(0)
    elif scaling == "none":
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    else:
        raise ValueError(f"data.scaling={scaling!r}; valid: ['minmax', 'none', 'standard']")
    return shift, np.where(scale > 1e-12, scale, 1.0)


def read_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d) float64, labels (n,) int64) from an .npz (x/X, y), .csv or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            key = "x" if "x" in f.files else "X"
        arrays = load_npz(path, (key, label_column))
        x, y = arrays[key], arrays[label_column]
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        if label_column not in frame.columns:
            raise DataFileError(f"{path} has no label column {label_column!r} (data.label_column); "
                                f"columns: {list(frame.columns)[:20]}")
        features = frame.drop(columns=[label_column])
        bad = [c for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
        if bad:
            raise DataFileError(f"{path}: non-numeric feature columns {bad[:10]}; encode them first")
        x, y = features.to_numpy(), frame[label_column].to_numpy()
    else:
        raise DataFileError(f"{path}: unsupported table format {suffix!r}; valid: ['.csv', '.npz', '.parquet']")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataFileError(f"{path}: features must be a 2-D table (n, d), got shape {x.shape}")
    y = np.asarray(y).ravel()
    if len(y) != len(x):
        raise DataFileError(f"{path}: {len(x)} feature rows but {len(y)} labels")
    if not np.isfinite(x).all():
        raise DataFileError(f"{path}: {int((~np.isfinite(x)).sum())} feature values are NaN/Inf")
    if not set(np.unique(y)) <= {0, 1}:
        raise DataFileError(f"{path}: labels must be 0 (inlier) / 1 (outlier), got values {np.unique(y)[:10]}")
    return x, y.astype(np.int64)


def available_names(root: Path) -> list[str]:
    return sorted(p.stem for p in root.glob("*.npz")) if root.is_dir() else []


class TabularDataModule(pl.LightningDataModule):
    """One outlier-detection table, split into train (fit, unlabelled) and test (scored) parts."""

    modality = "tabular"

    def __init__(
        self,
        name: str | None = None,
        path: str | None = None,
        root: str | None = None,
        label_column: str = "y",
        test_fraction: float = 0.3,
        scaling: str = "standard",
        split_seed: int = 0,
        batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """name: a set under `root` (<root>/<name>.npz); path: any .npz/.csv/.parquet file (wins over name).
        batch_size: null = full batch (one step per epoch holding the whole train part, as the APRE code)."""
        super().__init__()
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction={test_fraction} must be in (0, 1)")
        self.name, self.batch_size, self.num_workers, self.seed = name, batch_size, num_workers, seed
        self.path = self._resolve(name, path, root)
        x, y = read_table(self.path, label_column)
        if y.min() == y.max():
            raise DataFileError(f"{self.path}: every row has label {y[0]}; a test part needs inliers and outliers")
        train, test = stratified_split(y, test_fraction, split_seed)
        self.shift, self.scale = fit_scaler(x[train], scaling)  # the train part only: no test statistics leak
        scaled = ((x - self.shift) / self.scale).astype(np.float32)
        self.parts = {
            split: {"x": torch.from_numpy(scaled[rows]), "anomaly": torch.from_numpy(y[rows]),
                    "idx": torch.arange(len(rows))}
            for split, rows in (("train", train), ("test", test))
        }
        self.input_shape = (x.shape[1],)
        self.num_classes = 2

    @staticmethod
    def _resolve(name: str | None, path: str | None, root: str | None) -> Path:
        if path:
            p = Path(path).expanduser()
            if not p.is_file():
                raise missing_file(p)
            return p
        if not name:
            raise ConfigError("data: set data.name=<ADBench set> or data.path=<.npz/.csv/.parquet file>")
        if root is None:
            raise ConfigError("data.root is null: it must be the folder that holds <name>.npz")
        base = Path(root).expanduser()
        if not base.is_dir():
            raise missing_file(base / f"{name}.npz")
        p = base / f"{name}.npz"
        if not p.is_file():
            raise ConfigError(f"data.name={name!r} is not a dataset in {base}; valid names: "
                              f"{available_names(base)}")
        return p

    # -- batches ----------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int | None, shuffle: bool):
        part = self.parts[split]
        n = len(part["x"])
        if batch_size is None or batch_size >= n:
            return torch.utils.data.DataLoader(_Whole(part), batch_size=None, num_workers=0)
        from aeforge.data.loading import ResumableLoader

        return ResumableLoader(_Rows(part), batch_size=batch_size, shuffle=shuffle, seed=self.seed,
                               num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        # the loss on the (unlabelled) train part: no labels and no test rows are needed to train or monitor
        return self._loader("train", self.batch_size, shuffle=False)

    def eval_dataloader(self, split: str, batch_size: int):
        if split not in SPLITS:
            raise ConfigError(f"tabular data has splits {list(SPLITS)}, not {split!r}")
        part = self.parts[split]
        return torch.utils.data.DataLoader(_Rows(part), batch_size=batch_size, collate_fn=_identity)

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        return x  # scaled once at load time with the train part's statistics

    def describe(self) -> str:
        tr, te = self.parts["train"], self.parts["test"]
        return (f"TabularDataModule({self.path.stem}: d={self.input_shape[0]}, train {len(tr['x'])} rows "
                f"({int(tr['anomaly'].sum())} outliers, unlabelled), test {len(te['x'])} rows "
                f"({int(te['anomaly'].sum())} outliers))")


def _identity(batch):
    return batch


class _Rows(torch.utils.data.Dataset):
    """Rows of one split; `__getitems__` gathers a whole batch in one indexing op."""

    def __init__(self, part: dict[str, torch.Tensor]):
        self.part = part

    def __len__(self) -> int:
        return len(self.part["x"])

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[t] for k, v in self.part.items()}


class _Whole(torch.utils.data.IterableDataset):
    """The whole split as one batch (full-batch training)."""

    def __init__(self, part: dict[str, torch.Tensor]):
        self.part = part

    def __iter__(self):
        yield self.part

    def __len__(self) -> int:
        return 1
