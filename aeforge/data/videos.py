"""Video DataModules. Clips travel as uint8 (B, C, T, H, W); `on_after_batch_transfer` crops, flips and
scales them to [-1, 1] on the accelerator, as the image path does.

- ClipsDataModule (`data=video_clips`): the staged 64 px clips (`videos_64px.npz`: `<name>` (T, H, W, 3) uint8,
  `<name>_fps`), cut into clips of `frames` frames `stride` apart; one whole video is held out and its fixed
  clip(s) are the validation / evaluation set.
- VideoFileDataModule (video_files.py, `data=webvid`): a folder or HF dataset of video files, decoded with PyAV,
  with an optional captions table.

Batch contract: `x` uint8 (B, C, T, H, W) on the wire, float in [-1, 1] on the device; `is_image` bool (B,)
(images are videos of `image_frames` independent frames; a batch is all images or all videos, as VideoVAE+
trains); `caption` list[str] when captions are given. Images enter joint image-video training through
`images` (every source): "frames" (single frames of the training videos) or an .npz with `x` (N, H, W, 3).
"""

from __future__ import annotations

import csv
import logging
import zlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from aeforge.data.loading import ResumableLoader, _identity
from aeforge.data.sources import DataFileError, load_npz

log = logging.getLogger("aeforge")
CROPS = ("random", "center")


def resize_short(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., H, W) with the shorter side resized to `size` (area when shrinking, else bilinear)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    scale = size / min(h, w)
    out = (max(size, round(h * scale)), max(size, round(w * scale)))
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w).float()
    mode = "area" if scale < 1 else "bilinear"
    flat = F.interpolate(flat, size=out, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return flat.round().clamp(0, 255).to(torch.uint8).reshape(*lead, *out)


def crop_offsets(h: int, w: int, size: int, n: int, random: bool, generator=None, device=None):
    """Top-left corners (n,) of `size` crops: uniform over the valid range, or the centre."""
    if random:
        oy = torch.randint(h - size + 1, (n,), generator=generator, device=device)
        ox = torch.randint(w - size + 1, (n,), generator=generator, device=device)
        return oy, ox
    return torch.full((n,), (h - size) // 2, device=device), torch.full((n,), (w - size) // 2, device=device)


def crop_batch(x: torch.Tensor, size: int, random: bool) -> torch.Tensor:
    """(B, ..., H, W) -> (B, ..., size, size): a random crop per sample (training) or the centre crop."""
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    if min(h, w) < size:
        raise ValueError(f"clip of {h}x{w} pixels is smaller than the crop data.image_size={size}")
    oy, ox = crop_offsets(h, w, size, x.shape[0], random, device=x.device)
    if not random:
        return x[..., int(oy[0]) : int(oy[0]) + size, int(ox[0]) : int(ox[0]) + size]
    corners = zip(oy.tolist(), ox.tolist())
    return torch.stack([x[i, ..., y : y + size, c : c + size] for i, (y, c) in enumerate(corners)])


def batch_seed(seed: int, idx) -> int:
    """A seed fixed by the batch's indices: what a batch holds is a pure function of (seed, epoch order), so a
    resumed run sees the same batches (the loader's order already is one)."""
    return zlib.crc32(np.asarray([seed, *idx], dtype=np.int64).tobytes())


def read_captions(path: str, key: str = "path", caption_key: str = "caption") -> dict[str, str]:
    """A captions table (the WebVid CSV layout: one row per video with its path and caption): {path: caption}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileError(f"captions table not found: {p} (data.captions)")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in (key, caption_key) if k not in (reader.fieldnames or [])]
        if missing:
            raise DataFileError(f"captions table {p} lacks columns {missing}; it has {reader.fieldnames}")
        return {row[key]: row[caption_key] for row in reader}


class ImageFrames:
    """Still images for joint image-video training, uint8 (N, C, H, W); `group(idx)` stacks `frames`
    independent images per sample along time: (B, C, frames, H, W)."""

    def __init__(self, images: torch.Tensor, frames: int):
        self.images, self.frames = images, frames

    def __len__(self) -> int:
        return len(self.images)

    def group(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(self.images), (n, self.frames), generator=g)
        return self.images[pick].permute(0, 2, 1, 3, 4)


class ClipDataset(torch.utils.data.Dataset):
    """Fixed windows (video, start) over uint8 videos (C, T, H, W); `__getitems__` stacks a batch in one op.
    With `images` and `image_ratio` > 0, a batch is instead (with that probability, fixed by its indices) a
    batch of still images (`is_image` True)."""

    def __init__(self, videos: list[torch.Tensor], windows: list[tuple[int, int, int]], frames: int,
                 captions: list[str] | None = None, images: ImageFrames | None = None, image_ratio: float = 0.0,
                 seed: int = 0):
        self.videos, self.windows, self.frames, self.captions = videos, windows, frames, captions
        self.images, self.image_ratio, self.seed = images, image_ratio, seed

    def __len__(self) -> int:
        return len(self.windows)

    def clip(self, i: int) -> torch.Tensor:
        v, start, stride = self.windows[i]
        return self.videos[v][:, start : start + (self.frames - 1) * stride + 1 : stride]

    def __getitems__(self, idx: list[int]) -> dict:
        idx = list(idx)
        if self.images is not None and self.image_ratio > 0:
            s = batch_seed(self.seed, idx)
            if torch.rand((), generator=torch.Generator().manual_seed(s)).item() < self.image_ratio:
                x = self.images.group(len(idx), s)
                out = {"x": x, "is_image": torch.ones(len(idx), dtype=torch.bool)}
                if self.captions is not None:
                    out["caption"] = [""] * len(idx)  # stills carry no caption: the unconditional branch
                return out
        out = {"x": torch.stack([self.clip(i) for i in idx]), "is_image": torch.zeros(len(idx), dtype=torch.bool)}
        if self.captions is not None:
            out["caption"] = [self.captions[self.windows[i][0]] for i in idx]
        return out

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def videos_only(self) -> ClipDataset:
        """The same clips without the still-image batches (for evaluators)."""
        return ClipDataset(self.videos, self.windows, self.frames, self.captions)


class VideoDataModule(pl.LightningDataModule):
    """Shared behaviour of the video sources: uint8 clips in, [-1, 1] float clips out (cropped to `image_size`
    — at random and flipped while training, centred otherwise)."""

    modality = "video"

    def __init__(self, frames: int, image_size: int, batch_size: int, num_workers: int = 0, crop: str = "random",
                 hflip: bool = False, images: str | None = None, image_ratio: float = 0.0, image_frames: int = 1,
                 seed: int = 0):
        super().__init__()
        for key, value in (("frames", frames), ("image_size", image_size), ("image_frames", image_frames)):
            if value < 1:
                raise ValueError(f"data.{key}={value} must be >= 1")
        if not 0 <= image_ratio < 1:
            raise ValueError(f"data.image_ratio={image_ratio} must be in [0, 1) (the share of still-image batches)")
        if crop not in CROPS:
            raise ValueError(f"data.crop={crop!r} is not a crop mode; valid: {list(CROPS)}")
        if image_ratio > 0 and images is None:
            raise ValueError(f"data.image_ratio={image_ratio} asks for image batches but data.images is null; "
                             f"give data.images=frames (single frames of the training videos) or an .npz path")
        if images is not None and image_ratio == 0:
            raise ValueError(f"data.images={images!r} is given but data.image_ratio=0 would never use it; set "
                             f"data.image_ratio in (0, 1) or data.images=null")
        self.frames, self.image_size, self.crop, self.hflip = frames, image_size, crop, hflip
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.images_source, self.image_ratio, self.image_frames = images, image_ratio, image_frames
        self.input_shape = (3, frames, image_size, image_size)
        self.num_classes: int | None = None
        self.train_set = self.val_set = None

    # -- the device side ------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 (B, C, T, H, W) -> float in [-1, 1], cropped to image_size (random + flip when augmenting)."""
        x = crop_batch(x, self.image_size, random=augment and self.crop == "random")
        x = x.float().div(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()
        if augment and self.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        return x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).clamp(0, 1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        training = self.trainer is not None and self.trainer.training
        batch["x"] = self.normalize(batch["x"], augment=training)
        return batch

    def device_batch(self, batch: dict, device: torch.device, augment: bool = False) -> dict:
        """A batch of one of our loaders, outside Lightning (evaluators): on `device`, normalised."""
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["x"] = self.normalize(batch["x"], augment=augment)
        return batch

    # -- images for joint training ---------------------------------------------------------------------
    def load_images(self, train_videos: list[torch.Tensor]) -> ImageFrames | None:
        """The still images of joint training, at the videos' resolution (centre-cropped square)."""
        if self.images_source is None:
            return None
        if self.images_source == "frames":
            stills = torch.cat([v.permute(1, 0, 2, 3) for v in train_videos])
        else:
            arrays = load_npz(self.images_source, ("x",))
            x = torch.from_numpy(np.ascontiguousarray(arrays["x"]))
            if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
                raise DataFileError(f"data.images={self.images_source}: x must be uint8 (N, H, W, 3), got "
                                    f"{tuple(x.shape)} {x.dtype}")
            stills = x.permute(0, 3, 1, 2)
        side = min(train_videos[0].shape[-2:])
        stills = resize_short(stills.contiguous(), side)
        stills = crop_batch(stills, side, random=False) if stills.shape[-1] != stills.shape[-2] else stills
        return ImageFrames(stills.contiguous(), self.image_frames)

    # -- loaders ---------------------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool, batch_size: int | None = None) -> ResumableLoader:
        return ResumableLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle, seed=self.seed,
                               num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def eval_dataloader(self, split: str, batch_size: int) -> torch.utils.data.DataLoader:
        """Un-augmented, unshuffled loader for evaluators; split "val" is the fixed held-out clip(s)."""
        if split not in ("train", "val"):
            raise ValueError(f"eval split {split!r}; valid: ['train', 'val']")
        dataset = {"train": self.train_set, "val": self.val_set}[split]
        if split == "train" and hasattr(dataset, "videos_only"):
            dataset = dataset.videos_only()  # clips as held-out ones are read: no image batches, fixed starts
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                           collate_fn=_identity)

    def describe(self) -> str:
        n = len(self.train_set) if self.train_set is not None else "?"
        m = len(self.val_set) if self.val_set is not None else "?"
        joint = f", images {self.images_source} p={self.image_ratio}" if self.images_source else ""
        return f"{type(self).__name__}(video {self.input_shape}, {n} train / {m} val clips{joint})"


def clip_windows(lengths: list[int], frames: int, strides: list[int], hop: int) -> list[tuple[int, int, int]]:
    """(video, start, stride) of every clip of `frames` frames `stride` apart, starts `hop` source frames apart."""
    out = []
    for v, (n, stride) in enumerate(zip(lengths, strides)):
        span = (frames - 1) * stride + 1
        out += [(v, s, stride) for s in range(0, n - span + 1, hop)]
    return out


class ClipsDataModule(VideoDataModule):
    """Clips of the staged videos (`videos_64px.npz`). Training clips: every window of `frames` frames
    `stride` (or, with `fps`, the video's fps / fps) apart, starting every `hop` frames, of the videos other
    than `val_video`; the held-out set: `val_count` consecutive clips of `val_video` from frame `val_start` —
    fixed, never trained on, the clip the evaluators reconstruct. `resize` scales every frame once at load
    (shorter side); `image_size` is the crop."""

    def __init__(self, path: str, frames: int, image_size: int, stride: int = 1, fps: float | None = None,
                 hop: int = 4, resize: int | None = None, val_video: str = "cockatoo", val_start: int = 0,
                 val_count: int = 1, train_videos: list[str] | None = None, captions: str | None = None,
                 **kwargs):
        super().__init__(frames=frames, image_size=image_size, **kwargs)
        if fps is not None and stride != 1:
            raise ValueError(f"data.fps={fps} and data.stride={stride} both set the frame spacing; set one "
                             f"(data.stride=1 with fps, or data.fps=null)")
        for key, value in (("stride", stride), ("hop", hop), ("val_count", val_count),
                           ("fps", 1 if fps is None else fps), ("resize", 1 if resize is None else resize),
                           ("val_start", val_start + 1)):
            if value <= 0:
                raise ValueError(f"data.{key}={value if key != 'val_start' else val_start} must be "
                                 f"{'>= 0' if key == 'val_start' else '> 0'}")
        if train_videos is not None and not train_videos:
            raise ValueError("data.train_videos=[] leaves nothing to train on (null: every video but data.val_video)")
        arrays = load_npz(path, ())
        names = sorted(k for k in arrays if not k.endswith("_fps"))
        wanted = train_videos if train_videos is not None else [n for n in names if n != val_video]
        unknown = [n for n in [*wanted, val_video] if n not in names]
        if unknown:
            raise DataFileError(f"{path} has no videos {unknown}; it has {names}")
        if val_video in wanted:
            raise ValueError(f"data.val_video={val_video!r} is also a training video (data.train_videos): the "
                             f"held-out clip must be unseen")

        def load(name: str) -> torch.Tensor:
            v = torch.from_numpy(np.ascontiguousarray(arrays[name])).permute(3, 0, 1, 2).contiguous()  # C,T,H,W
            return resize_short(v, resize) if resize is not None else v

        def stride_of(name: str) -> int:
            if fps is None:
                return stride
            return max(1, round(float(arrays.get(f"{name}_fps", fps)) / fps))

        train = [load(n) for n in wanted]
        windows = clip_windows([v.shape[1] for v in train], frames, [stride_of(n) for n in wanted], hop)
        short = [n for i, n in enumerate(wanted) if not any(w[0] == i for w in windows)]
        if short:
            log.warning("video_clips: %s are shorter than one clip of %d frames at this stride; not used", short,
                        frames)
        if not windows:
            raise DataFileError(f"{path}: no training video is long enough for a clip of {frames} frames at "
                                f"data.stride/fps; lower data.frames or the stride")
        val = load(val_video)
        vs = stride_of(val_video)
        span = (frames - 1) * vs + 1
        val_windows = [(0, val_start + k * span, vs) for k in range(val_count)]
        if val_start + val_count * span > val.shape[1]:
            raise DataFileError(f"{path}: {val_video} has {val.shape[1]} frames, too few for data.val_count="
                                f"{val_count} clips of {frames} frames from data.val_start={val_start}")
        if min(val.shape[-2:]) < image_size:
            raise ValueError(f"data.image_size={image_size} is larger than the frames ({tuple(val.shape[-2:])}); "
                             f"lower it or raise data.resize")
        caps = read_captions(captions) if captions else None

        def caption_list(vnames):
            if caps is None:
                return None
            missing = [n for n in vnames if n not in caps]
            if missing:
                raise DataFileError(f"captions table {captions} has no row for videos {missing}")
            return [caps[n] for n in vnames]

        self.train_set = ClipDataset(train, windows, frames, caption_list(wanted), self.load_images(train),
                                     self.image_ratio, seed=self.seed)
        self.val_set = ClipDataset([val], val_windows, frames, caption_list([val_video]))
        self.val_clip = f"{val_video}[{val_start}:{val_start + val_count * span}:{vs}]"
        self.train_videos = wanted
