"""Image anomaly data with pixel masks (StRegA / ceVAE, docs/methods/strega.md).

Training images are normal only; the validation and test splits mix normal images with images that carry
pasted "lesions", and their batches add `anomaly` (B,) (1 = has a lesion) and `anomaly_mask` (B, 1, H, W)
(uint8, 1 = lesion pixel), plus `foreground` (B, 1, H, W) (val/test): the object / "brain" mask of the clean
image (the skull-stripping mask an MRI pipeline has; the card's post-processing zeroes the map outside it).

Sources (`source`):
- "brainlike": synthetic MRI-style slices: an elliptic "brain" with white matter, a grey-matter rim, dark
  "ventricles" and smooth intensity drift; deterministic by seed. For tests and the synthetic proof.
- "npz": real images from an .npz (x, y[, x_test, y_test]; e.g. staged Fashion-MNIST), with the same lesions
  pasted inside the object.

Lesions: 1..`max_lesions` ellipses per anomalous image, radii a fraction of the image side, centred on a
foreground pixel, clipped to the foreground, filled bright (p = `bright_prob`) or dark with a little pixel
noise. Lesions depend on `lesion_seed` only, so every run seed is scored on the same test images.
Images stay uint8 on the wire; ImageDataModule normalises `x` on the device (the masks are not touched).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from aeforge.data.images import ImageDataModule, _as_nchw
from aeforge.data.loading import _identity
from aeforge.data.sources import DataFileError, load_npz

SOURCES = ("brainlike", "npz")


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """(n, size, size) low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 1, cells, cells)).astype(np.float32))
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return up[:, 0].numpy()


def brainlike_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, 1, size, size) uint8 synthetic axial "brain" slices, a pure function of (n, size, seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    col = lambda a: a[:, None, None]  # noqa: E731  (per-image parameter against the pixel grid)
    cy, cx = col(rng.uniform(-0.06, 0.06, n)), col(rng.uniform(-0.06, 0.06, n))
    ay, ax = col(rng.uniform(0.78, 0.9, n)), col(rng.uniform(0.62, 0.74, n))
    r = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    brain = r < 1.0
    img = np.where(brain, 0.72, 0.0)  # white matter
    img = np.where(brain & (r > 0.8), 0.5, img)  # grey-matter rim
    # two ventricles (dark, CSF-like) left and right of the midline
    vy, vx = col(rng.uniform(0.22, 0.34, n)), col(rng.uniform(0.08, 0.13, n))
    off, tilt = col(rng.uniform(0.12, 0.2, n)), col(rng.uniform(-0.1, 0.1, n))
    for side in (-1.0, 1.0):
        rv = np.sqrt(((yy - cy - tilt * side) / vy) ** 2 + ((xx - cx - side * off) / vx) ** 2)
        img = np.where(brain & (rv < 1.0), 0.22, img)
    drift = 0.06 * _smooth_noise(rng, n, size, 5)
    img = np.where(brain, img + drift + 0.02 * rng.standard_normal((n, size, size)), 0.0)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)[:, None]


def foreground_mask(x: np.ndarray, threshold: int) -> np.ndarray:
    """(N, 1, H, W) bool: pixels above `threshold` in any channel, holes filled (the object's outline)."""
    fg = (x > threshold).any(axis=1)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)  # fill each image's holes, not across images
    return ndimage.binary_fill_holes(fg, structure=in_plane)[:, None]


def paste_lesions(
    x: np.ndarray,
    foreground: np.ndarray,
    seed: int,
    max_lesions: int,
    radius: tuple[float, float],
    bright_prob: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Lesions pasted into every image of x (N, C, H, W) uint8: (lesioned images, masks (N, 1, H, W) bool).
    A lesion pixel is inside an ellipse and inside `foreground`; pixels outside the mask are never changed."""
    rng = np.random.default_rng(seed)
    n, c, h, w = x.shape
    out, masks = x.copy(), np.zeros((n, 1, h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        fy, fx = np.nonzero(foreground[i, 0])
        if len(fy) == 0:
            raise DataFileError(f"image {i} has no foreground pixel to put a lesion in (data.foreground_threshold)")
        for _ in range(int(rng.integers(1, max_lesions + 1))):
            j = int(rng.integers(len(fy)))
            ry, rx = rng.uniform(*radius, size=2) * np.array([h, w])
            ell = ((yy - fy[j]) / max(ry, 0.5)) ** 2 + ((xx - fx[j]) / max(rx, 0.5)) ** 2 <= 1.0
            ell &= foreground[i, 0]
            level = rng.uniform(0.9, 1.0) if rng.random() < bright_prob else rng.uniform(0.0, 0.1)
            values = np.clip(level + 0.03 * rng.standard_normal((c, h, w)), 0, 1) * 255
            out[i][:, ell] = values[:, ell].round().astype(np.uint8)
            masks[i, 0] |= ell
    return out, masks


class LesionImageDataset(torch.utils.data.Dataset):
    """uint8 images with per-image `anomaly`, pixel `anomaly_mask` and `foreground`; batched reads."""

    def __init__(self, x, y, anomaly, mask, foreground):
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(x)), y
        self.anomaly = torch.as_tensor(anomaly, dtype=torch.long)
        self.mask = torch.from_numpy(mask.astype(np.uint8))
        self.foreground = None if foreground is None else torch.from_numpy(foreground.astype(np.uint8))

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        out = {"x": self.x[i], "anomaly": self.anomaly[i], "anomaly_mask": self.mask[i]}
        if self.foreground is not None:
            out["foreground"] = self.foreground[i]
        if self.y is not None:
            out["y"] = self.y[i]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class LesionImageDataModule(ImageDataModule):
    """Normal training images; val / test mix normal and lesioned images (`lesion_fraction` of them).

    source="npz": `path` with x, y and x_test, y_test: the last `num_val` training images are the val split,
    the first `num_test` test images the test split (0: all). source="brainlike": `num_train`/`num_val`/
    `num_test` synthetic slices of `image_size` pixels."""

    def __init__(
        self,
        source: str = "brainlike",
        path: str | None = None,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 256,
        image_size: int = 64,
        lesion_fraction: float = 0.5,
        max_lesions: int = 3,
        lesion_radius: list[float] = (0.05, 0.15),
        bright_prob: float = 0.5,
        foreground_threshold: int = 0,
        lesion_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if source not in SOURCES:
            raise DataFileError(f"data.source={source!r} is not a lesion data source; choose one of {list(SOURCES)}")
        if not 0 < lesion_fraction < 1:
            raise DataFileError(f"data.lesion_fraction={lesion_fraction} must be in (0, 1): val/test need normal "
                                f"and lesioned images")
        if len(lesion_radius) != 2 or not 0 < lesion_radius[0] <= lesion_radius[1] <= 0.5:
            raise DataFileError(f"data.lesion_radius={list(lesion_radius)} must be [min, max] with 0 < min <= max "
                                f"<= 0.5 (fractions of the image side)")
        if max_lesions < 1:
            raise DataFileError(f"data.max_lesions={max_lesions} must be >= 1")
        self.source, self.path = source, path
        self.lesion = dict(max_lesions=max_lesions, radius=tuple(lesion_radius), bright_prob=bright_prob)
        self.lesion_fraction, self.fg_threshold, self.lesion_seed = lesion_fraction, foreground_threshold, lesion_seed
        if source == "brainlike":
            x = brainlike_images(num_train + num_val, image_size, seed=lesion_seed)
            xt = brainlike_images(num_test, image_size, seed=lesion_seed + 1)
            y = yt = None
            if self.mean.shape[1] != 1:
                raise DataFileError("data.source=brainlike makes 1-channel images; set data.mean/std to one value")
        else:
            x, y, xt, yt = self._read_npz(path, num_val)
            xt, yt = (xt[:num_test], yt[:num_test]) if num_test else (xt, yt)
        x_train, y_train = x[: len(x) - num_val], y[: len(x) - num_val] if y is not None else None
        x_val, y_val = x[len(x) - num_val:], y[len(x) - num_val:] if y is not None else None
        self.train_set = self._split(x_train, y_train, lesions=False, seed=lesion_seed)
        self.val_set = self._split(x_val, y_val, lesions=True, seed=lesion_seed + 10)
        self.test_set = self._split(xt, yt, lesions=True, seed=lesion_seed + 20)
        self.input_shape = tuple(x.shape[1:])
        self.num_classes = int(max(y.max(), yt.max())) + 1 if y is not None else None

    def _read_npz(self, path: str | None, num_val: int):
        if not path:
            raise DataFileError("data.source=npz needs data.path=<file.npz> with x, y, x_test, y_test")
        arrays = load_npz(path, ("x", "y", "x_test", "y_test"))
        x, xt = _as_nchw(arrays["x"]).numpy(), _as_nchw(arrays["x_test"]).numpy()
        if x.shape[1] != self.mean.shape[1]:
            raise DataFileError(f"{path} has {x.shape[1]}-channel images but data.mean/std give "
                                f"{self.mean.shape[1]} channels")
        if not 0 < num_val < len(x):
            raise DataFileError(f"data.num_val={num_val} must be in [1, {len(x) - 1}] for {path} ({len(x)} images)")
        y, yt = (torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y", "y_test"))
        return x, y, xt, yt

    def _split(self, x: np.ndarray, y, lesions: bool, seed: int) -> LesionImageDataset:
        # the foreground is what evaluators and lesions need; training images (all normal) skip it (~0.1 ms each)
        fg = foreground_mask(x, self.fg_threshold) if lesions else None
        anomaly = np.zeros(len(x), dtype=np.int64)
        mask = np.zeros((len(x), 1, *x.shape[2:]), dtype=bool)
        if lesions:
            rng = np.random.default_rng(seed)
            anomaly = (rng.random(len(x)) < self.lesion_fraction).astype(np.int64)
            idx = np.flatnonzero(anomaly)
            x = x.copy()
            x[idx], mask[idx] = paste_lesions(x[idx], fg[idx], seed + 1, **self.lesion)
        return LesionImageDataset(x, y, anomaly, mask, fg)

    def eval_dataloader(self, split: str, batch_size: int) -> torch.utils.data.DataLoader:
        """Un-augmented, unshuffled loader of train (normal), val or test (both with lesions)."""
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        if split not in sets:
            raise ValueError(f"{type(self).__name__} has splits {list(sets)}; got {split!r}")
        return torch.utils.data.DataLoader(sets[split], batch_size=batch_size, num_workers=self.num_workers,
                                           collate_fn=_identity)

    def describe(self) -> str:
        src = self.path if self.source == "npz" else f"brainlike {self.input_shape}"
        return (f"{type(self).__name__}({src}: {len(self.train_set)} normal train, {len(self.val_set)} val, "
                f"{len(self.test_set)} test, {self.lesion_fraction:.0%} lesioned)")
