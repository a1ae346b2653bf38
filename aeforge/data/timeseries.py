"""Sliding-window multivariate time series for anomaly detection (NASA SMAP/MSL, SKAB, synthetic groups).

Layouts of the staged `.npz` files (../shared/data/README.md §4):
- NASA telemanom (`smap.npz`, `msl.npz`): `channels` (entity names such as P_1), and per entity `<CH>_train`
  (T, d), `<CH>_test` (T, d), `<CH>_labels` (T,) with 1 = anomaly. `data.channel=P-1` and `P_1` both work.
- SKAB (`skab.npz`): `anomaly_free_anomaly_free_x` (T, 8) is the training series; each experiment `<name>_x`
  (T, 8) / `<name>_y` (T,) is a test series (`data.channel=valve1_0`, or all 34).

`channel: all` (the default) trains one model on the train parts of every entity and tests on all test parts,
as OmniAnomaly's concatenated SMAP/MSL sets do; a window never crosses from one entity (or file) to another.
Normalisation (min-max to [0, 1] or z-score per dimension) is fitted on the selected train data only.

Batches: `x` (B, window, d) float, already normalised; test/val batches also carry `anomaly` (B,), the label of
the window's **last** step (the standard protocol: the window ending at t scores point t), `t` (B,), the index of
that step in the concatenated test points, and `series` (B,), the entity it belongs to. With `test_stride: 1` and
`test_pad: edge` (the defaults) every test point is the last step of exactly one window: each entity's test part
is left-padded with W-1 copies of its first row, so the first W-1 points get a score too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from aeforge.data.loading import ResumableLoader, _identity
from aeforge.data.sources import DataFileError, load_npz

SKAB_TRAIN = "anomaly_free_anomaly_free_x"


class SeriesWindows(torch.utils.data.Dataset):
    """Windows cut on demand from one concatenated (T, d) array (no N×W×d copy); `__getitems__` = one gather."""

    def __init__(self, values: torch.Tensor, ends: np.ndarray, window: int, labels: torch.Tensor | None = None,
                 points: np.ndarray | None = None, series: np.ndarray | None = None):
        self.values, self.window, self.labels = values, window, labels
        self.ends = torch.from_numpy(np.asarray(ends, dtype=np.int64))
        self.points = None if points is None else torch.from_numpy(np.asarray(points, dtype=np.int64))
        self.series = None if series is None else torch.from_numpy(np.asarray(series, dtype=np.int64))
        self.offsets = torch.arange(-window + 1, 1)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        out = {"x": self.values[self.ends[i, None] + self.offsets]}
        if self.points is not None:
            t = self.points[i]
            out["t"], out["series"] = t, self.series[i]
            if self.labels is not None:
                out["anomaly"] = self.labels[t]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def read_series(path: str | os.PathLike, channel: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray],
                                                              list[np.ndarray], int]:
    """(entity names, train parts, test parts, test labels, d) of the `channel` selection in a staged file.
    SKAB has one train series for all experiments (its train list holds it once)."""
    arrays = load_npz(path, ())
    if "channels" in arrays:
        names = [str(c) for c in arrays["channels"]]
        layout = "NASA"
    elif SKAB_TRAIN in arrays:
        names = sorted(k[: -len("_y")] for k in arrays if k.endswith("_y") and f"{k[:-2]}_x" in arrays)
        layout = "SKAB"
    else:
        raise DataFileError(f"{path}: neither the NASA layout (a `channels` array) nor the SKAB one (`{SKAB_TRAIN}`); "
                            f"it has {sorted(arrays)[:8]}")
    wanted = names if channel == "all" else [c.strip().replace("-", "_") for c in channel.split(",")]
    unknown = [c for c in wanted if c not in names]
    if unknown:
        shown = [n.replace("_", "-") if layout == "NASA" else n for n in names]
        raise ValueError(f"data.channel={channel!r}: {unknown} not in {Path(path).name}; valid: 'all', a comma-"
                         f"separated list, or one of {shown}")
    if layout == "NASA":
        missing = [f"{c}_{p}" for c in wanted for p in ("train", "test", "labels") if f"{c}_{p}" not in arrays]
        if missing:
            raise DataFileError(f"{path} lacks arrays {missing[:6]}")
        train = [arrays[f"{c}_train"] for c in wanted]
        test = [arrays[f"{c}_test"] for c in wanted]
        labels = [arrays[f"{c}_labels"] for c in wanted]
    else:
        train = [arrays[SKAB_TRAIN]]
        test = [arrays[f"{c}_x"] for c in wanted]
        labels = [arrays[f"{c}_y"] for c in wanted]
    dims = [p.shape[1] for p in (*train, *test) if p.ndim == 2]
    d = max(set(dims), key=dims.count) if dims else -1  # the common width: the odd part is the one named
    for name, part in [*zip(wanted, train), *zip(wanted, test)]:
        if part.ndim != 2 or part.shape[1] != d:
            raise DataFileError(f"{path}: {name} has shape {part.shape}; expected (T, {d}) like the others")
    for name, x, y in zip(wanted, test, labels):
        if y.shape != (len(x),):
            raise DataFileError(f"{path}: labels of {name} have shape {y.shape}, its test part {x.shape}")
    return wanted, train, test, labels, d


def window_ends(lengths: list[int], window: int, stride: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """For parts of `lengths` concatenated (each preceded by `pad` padding rows): (end index of each window in
    the concatenated array, index of that end in the unpadded concatenation, part id). Windows stay inside a part;
    the last step of each part is always an end, so stride > 1 never drops a part's tail."""
    ends, points, part = [], [], []
    start = point0 = 0
    for i, n in enumerate(lengths):
        first = window - 1 - pad  # in the unpadded part's coordinates
        if n + pad >= window:
            local = np.arange(n - 1, max(first, 0) - 1, -stride)[::-1]
            local = local[local >= first]
            ends.append(start + pad + local)
            points.append(point0 + local)
            part.append(np.full(len(local), i))
        start += n + pad
        point0 += n
    cat = (lambda a: np.concatenate(a) if a else np.zeros(0, np.int64))
    return cat(ends), cat(points), cat(part)


class TimeSeriesDataModule(pl.LightningDataModule):
    """Train windows from the normal (train) parts, test windows with per-step labels; see the module doc."""

    modality = "timeseries"

    def __init__(
        self,
        path: str,
        channel: str = "all",
        window: int = 100,
        stride: int = 1,
        test_stride: int = 1,
        test_pad: str = "edge",
        normalization: str = "minmax",
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """path: a staged .npz (NASA or SKAB layout). channel: `all`, an entity (P-1), or a comma-separated list.
        window / stride: window length W and the step between training windows (the card: 100 / 1).
        test_stride / test_pad: step between test windows; `edge` left-pads each test part with W-1 copies of
        its first row so every point is scored, `none` scores points from the W-th on.
        normalization: minmax ([0, 1] per dimension, train min/max), zscore, or none.
        val_fraction: the last fraction of each train part's windows (in time) held out for val/loss."""
        super().__init__()
        if window < 2:
            raise ValueError(f"data.window={window}: a window needs at least 2 steps")
        if stride < 1 or test_stride < 1:
            raise ValueError(f"data.stride={stride} / data.test_stride={test_stride}: must be >= 1")
        if test_pad not in ("edge", "none"):
            raise ValueError(f"data.test_pad={test_pad!r}; valid: ['edge', 'none']")
        if normalization not in ("minmax", "zscore", "none"):
            raise ValueError(f"data.normalization={normalization!r}; valid: ['minmax', 'none', 'zscore']")
        self.path, self.channel, self.window = path, str(channel), window
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        names, train, test, labels, d = read_series(path, self.channel)
        self.entities, self.num_dims = names, d
        fit = np.concatenate(train).astype(np.float64)
        if normalization == "minmax":
            lo, span = fit.min(0), fit.max(0) - fit.min(0)
            scale = np.where(span > 0, span, 1.0)  # a constant dimension (SMAP's unused command bits) stays 0
        elif normalization == "zscore":
            lo, sd = fit.mean(0), fit.std(0)
            scale = np.where(sd > 0, sd, 1.0)
        else:
            lo, scale = np.zeros(d), np.ones(d)
        self.shift, self.scale = lo.astype(np.float32), scale.astype(np.float32)
        norm = [((p - self.shift) / self.scale).astype(np.float32) for p in train]

        ends, _, part = window_ends([len(p) for p in norm], window, stride)
        if not len(ends):
            raise DataFileError(f"{path}: no train part of {self.channel!r} is as long as data.window={window}")
        values = torch.from_numpy(np.concatenate(norm))
        held = np.zeros(len(ends), bool)
        for i in np.unique(part):  # the tail of each part in time, so val windows overlap train ones least
            idx = np.flatnonzero(part == i)
            held[idx[len(idx) - int(math.floor(val_fraction * len(idx))):]] = val_fraction > 0
        self.train_set = SeriesWindows(values, ends[~held], window)
        self.val_set = SeriesWindows(values, ends[held], window) if held.any() else None

        pad = window - 1 if test_pad == "edge" else 0
        parts = [np.pad(((p - self.shift) / self.scale).astype(np.float32), ((pad, 0), (0, 0)), mode="edge")
                 for p in test]
        t_ends, t_points, t_series = window_ends([len(p) for p in test], window, test_stride, pad)
        self.point_labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        self.test_set = SeriesWindows(torch.from_numpy(np.concatenate(parts)), t_ends, window,
                                      self.point_labels, t_points, t_series)
        self.input_shape = (window, d)
        self.num_classes = None

    # -- batches are normalised when read: nothing to do on the device ---------------------------------------
    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        return x.float()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.as_tensor(self.scale, device=x.device) + torch.as_tensor(self.shift, device=x.device)

    def _loader(self, dataset, shuffle: bool) -> ResumableLoader:
        return ResumableLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, seed=self.seed,
                               num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set or self.train_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)

    def eval_dataloader(self, split: str, batch_size: int) -> torch.utils.data.DataLoader:
        """Windows of `split` in time order (test: with anomaly, t, series), for evaluators."""
        sets = {"train": self.train_set, "val": self.val_set or self.train_set, "test": self.test_set}
        if split not in sets:
            raise ValueError(f"split {split!r}; valid: {sorted(sets)}")
        return torch.utils.data.DataLoader(sets[split], batch_size=batch_size, num_workers=self.num_workers,
                                           collate_fn=_identity)

    def describe(self) -> str:
        what = self.channel if len(self.entities) < 4 else f"all {len(self.entities)} parts"
        return (f"TimeSeriesDataModule({Path(self.path).name}: {what}, d={self.num_dims}, window={self.window}, "
                f"{len(self.train_set)} train / {len(self.test_set)} test windows, "
                f"test anomaly rate {float(self.point_labels.float().mean()):.3f})")


def synthetic_groups(groups: int = 3, per_group: int = 4, train_len: int = 2000, test_len: int = 2000,
                     noise: float = 0.1, anomalies: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A NASA-layout series (entity `G_1`) of `groups` × `per_group` channels: each group shares a latent
    signal (two sinusoids of its own periods, channel-specific gain and offset) plus noise. The test part has
    `anomalies` segments of 10–30 steps: spikes, level shifts, or a group's channels decorrelated (one channel
    follows another group's latent). Returns the arrays plus `groups` (C,), the true group of each channel."""
    rng = np.random.default_rng(seed)
    c = groups * per_group
    member = np.repeat(np.arange(groups), per_group)
    periods = rng.uniform(20, 80, size=(groups, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(groups, 2))
    gain, offset = rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)

    def make(n: int, t0: int) -> np.ndarray:
        t = np.arange(t0, t0 + n)[:, None]
        latent = np.sin(2 * np.pi * t / periods[:, 0] + phase[:, 0]) + 0.5 * np.sin(2 * np.pi * t / periods[:, 1]
                                                                                    + phase[:, 1])
        return latent[:, member] * gain + offset + noise * rng.normal(size=(n, c))

    train, test = make(train_len, 0), make(test_len, train_len)
    labels = np.zeros(test_len, np.uint8)
    starts = np.sort(rng.choice(np.arange(50, test_len - 50, 60), size=anomalies, replace=False))
    other = make(test_len, 7 * train_len)  # independent draw: its channels follow the latents at other phases
    for k, s in enumerate(starts):
        n = int(rng.integers(10, 31))
        ch = rng.choice(c, size=max(1, per_group // 2), replace=False)
        kind = k % 3
        if kind == 0:
            test[s : s + n, ch] += rng.choice([-1, 1]) * 3.0
        elif kind == 1:
            test[s : s + n, ch] += rng.choice([-1, 1]) * 1.5
        else:
            src = (member[ch] + 1) % groups  # a channel now tracks another group's latent
            test[s : s + n, ch] = other[s : s + n, src * per_group]
        labels[s : s + n] = 1
    return {"channels": np.array(["G_1"]), "G_1_train": train.astype(np.float32),
            "G_1_test": test.astype(np.float32), "G_1_labels": labels, "groups": member}


def save_series_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
