"""Image DataModules. Images travel as uint8 (B, C, H, W); `on_after_batch_transfer` converts, normalises
and augments them on the accelerator, so the input path keeps up with a GPU.

- ArrayImageDataModule: `.npz` arrays (x, y[, x_test, y_test]), e.g. the MNIST subset shipped in the package.
- HFImageDataModule (hf_images.py): Hugging Face `datasets` (hub name, local folders, save_to_disk dir).
- SyntheticImageDataModule: class templates + noise, for tests and benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from aeforge.data.loading import ResumableLoader, _identity
from aeforge.data.sources import DataFileError, load_npz  # noqa: F401  (DataFileError: re-exported)


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
    `val_fraction` of the training images (a fixed, seeded split) is held out; with one, `val_fraction` must
    be 0 (both is an error, not a silent choice of one)."""

    def __init__(self, path: str, val_fraction: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.path, self.val_fraction = path, val_fraction
        self._peek()

    def _peek(self) -> None:
        arrays = load_npz(self.path, ("x", "y"))
        x, y = _as_nchw(arrays["x"]), torch.from_numpy(arrays["y"].astype(np.int64))
        if "x_test" in arrays and self.val_fraction > 0:
            # one of the two would be ignored without a word: validation on other images than the user thinks
            raise DataFileError(
                f"{self.path} has a test part (x_test) and data.val_fraction={self.val_fraction} would hold out "
                f"training images instead, ignoring x_test. Set data.val_fraction=0 to validate on x_test, or "
                f"use a file without x_test/y_test to validate on a held-out fraction of x"
            )
        if "x_test" in arrays:
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
