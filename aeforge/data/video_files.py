"""Video files — a folder, or a Hugging Face dataset with a video column — decoded with PyAV in the loader
workers, with an optional captions table in the WebVid layout (`data=webvid`).

Why PyAV: torchvision.io's video reading is deprecated (torchvision 0.22 warns; its successor torchcodec is a
separate install tied to torch versions); PyAV is maintained, bundles its own FFmpeg in the wheel, reads files
and in-memory bytes alike, and resizes in FFmpeg's swscale (`VideoFrame.reformat`) only the frames a clip
keeps. Frames are decoded from the start of the file (see decode_clip on seeking).

Clip sampling: `frames` frames, `stride` source frames apart or, with `fps`, at that rate (times, so variable
frame rates and GIFs sample right); training clips start at a random time, held-out clips at `val_position`
(a fraction of the free span: fixed clips). The shorter side is resized to `resize` (default: image_size) and
the crop is random in training, centred otherwise. Still images (`images`: a folder of image files or an .npz)
join as image batches (`is_image`), as in data=video_clips.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import torch

from aeforge.data.sources import DataFileError, check_local_or_hub, missing_file
from aeforge.data.videos import ImageFrames, VideoDataModule, batch_seed, crop_offsets, resize_short

log = logging.getLogger("aeforge")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".gif")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SOURCES = ("folder", "hf")


def _open(src):
    import av

    return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src))


def decode_clip(src, name: str, frames: int, stride: int, fps: float | None, position: float, resize: int,
                pad_short: bool = False) -> torch.Tensor:
    """uint8 (3, frames, H', W') of the video at `src` (a path or the file's bytes; `name` for errors): frames
    `stride` source frames (or 1/fps s) apart, starting at `position` (0..1) of the time it can start in, the
    shorter side resized to `resize`. A file that is missing or does not decode raises DataFileError naming it;
    one too short for the clip too, unless pad_short (then the last frame repeats)."""
    import av

    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise DataFileError(f"video file not found: {src}")
    try:
        with _open(src) as container:
            if not container.streams.video:
                raise DataFileError(f"{name}: no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            step = 1.0 / fps if fps else stride / rate
            duration = (float(stream.duration * stream.time_base) if stream.duration else
                        container.duration / av.time_base if container.duration else None)
            span = (frames - 1) * step
            free = max((duration or 0.0) - 1.0 / rate - span, 0.0)  # the last frame starts 1/rate before the end
            t0 = position * free
            # decoded from the first frame, no seek: after a seek to the keyframe before t0, cockatoo.mp4 (H.264
            # High 4:4:4, whose "keyframes" are not all IDR frames) decodes to green garbage for seconds
            targets = [t0 + k * step for k in range(frames)]
            picked, prev, prev_t, k, count = [], None, None, 0, 0
            for f in container.decode(stream):
                t = f.time if f.time is not None else count / rate
                count += 1
                while k < frames and t >= targets[k] - 1e-6:
                    near_prev = prev is not None and abs(targets[k] - prev_t) < abs(t - targets[k])
                    picked.append(prev if near_prev else f)
                    k += 1
                if k == frames:
                    break
                prev, prev_t = f, t
            if k < frames and prev is not None and targets[k] - prev_t <= step:  # ends within one step: its last frame
                picked.append(prev)
                k += 1
            if k < frames:
                if not picked and prev is None:
                    raise DataFileError(f"{name}: no frame decodes")
                if not pad_short:
                    raise DataFileError(
                        f"{name}: too short for a clip of {frames} frames {step:.3f} s apart ({span:.2f} s; the file "
                        f"has {(prev_t or 0) + 1 / rate:.2f} s). Lower data.frames or data.fps/stride, or set "
                        f"data.pad_short=true to repeat its last frame")
                picked += [picked[-1] if picked else prev] * (frames - k)
            h, w = picked[0].height, picked[0].width
            scale = resize / min(h, w)
            size = (max(resize, round(w * scale)), max(resize, round(h * scale)))
            arrays = [f.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray() for f in picked]
    except av.FFmpegError as e:
        raise DataFileError(f"{name}: the video does not decode ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2).contiguous()


def read_table(path: str, path_format: str, caption_key: str | None) -> tuple[list[str], list[str] | None]:
    """(relative file paths, captions) of a captions table: each row's path is `path_format` filled from its
    columns ("{path}"; WebVid's own CSV: "{page_dir}/{videoid}.mp4" with caption_key=name)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileError(f"captions table not found: {p}")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        paths, caps = [], []
        for row in reader:
            try:
                paths.append(path_format.format(**row))
            except KeyError as e:
                raise DataFileError(f"captions table {p}: data.path_format={path_format!r} names column {e}, "
                                    f"not among its columns {cols}") from None
            if caption_key is not None:
                if caption_key not in row:
                    raise DataFileError(f"captions table {p} has no column data.caption_key={caption_key!r}; "
                                        f"it has {cols}")
                caps.append(row[caption_key])
    return paths, caps if caption_key is not None else None


def load_image_folder(folder: Path, size: int) -> torch.Tensor:
    """Every image of a folder, uint8 (N, 3, size, size): shorter side to `size`, centre crop."""
    from PIL import Image

    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataFileError(f"data.images={folder}: no image files ({', '.join(IMAGE_EXTS)})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
        except (OSError, SyntaxError) as e:
            raise DataFileError(f"{f}: the image does not decode ({type(e).__name__}: {e})") from None
        x = resize_short(x, size)
        oy, ox = crop_offsets(x.shape[-2], x.shape[-1], size, 1, random=False)
        out.append(x[:, int(oy) : int(oy) + size, int(ox) : int(ox) + size])
    return torch.stack(out)


class ClipSource:
    """What the loader workers need to read clips, copied from the DataModule (which holds a trainer once
    fitting starts and is not theirs to carry): sampling settings and where the videos are."""

    FIELDS = ("seed", "frames", "stride", "fps", "resize", "pad_short", "image_size", "crop", "image_ratio",
              "val_position", "clips_per_video", "has_captions", "source_kind", "root", "hf", "video_key",
              "caption_key", "path")

    def __init__(self, dm: VideoFileDataModule):
        for name in self.FIELDS:
            setattr(self, name, getattr(dm, name, None))

    def resolve(self, items, i: int, captions: list[str] | None):
        """(path or bytes, name, caption) of items[i]."""
        item = items[i]
        if self.source_kind == "folder":
            return self.root / item, str(self.root / item), captions[i] if captions is not None else None
        split, row_i = item
        row = self.hf[split][row_i]
        video, caption = row[self.video_key], row.get(self.caption_key) if self.has_captions else None
        name = f"{self.path}[{split}][{row_i}]"
        if isinstance(video, dict):
            video = video.get("bytes") or video.get("path")
        if isinstance(video, str):
            full = Path(video) if Path(video).is_absolute() or self.root is None else self.root / video
            return full, f"{name} ({full})", caption
        if isinstance(video, (bytes, bytearray)):
            return bytes(video), name, caption
        raise DataFileError(f"{name}: column {self.video_key!r} holds {type(video).__name__}, not a path or bytes")


class VideoFiles(torch.utils.data.Dataset):
    """Videos (paths or HF rows) -> clips; a batch's random choices (clip starts, crops, whether it is an image
    batch) come from a seed fixed by its indices, so they are reproducible and resume exactly."""

    def __init__(self, spec: ClipSource, items, captions: list[str] | None, train: bool,
                 images: ImageFrames | None = None):
        self.spec, self.items, self.captions, self.train, self.images = spec, items, captions, train, images

    def __len__(self) -> int:
        return len(self.items) * (self.spec.clips_per_video if self.train else 1)

    def source(self, i: int):
        """(path or bytes, name for errors, caption or None) of item i (training: clips_per_video items a video)."""
        return self.spec.resolve(self.items, i % len(self.items), self.captions)

    def __getitems__(self, idx: list[int]) -> dict:
        spec, idx = self.spec, list(idx)
        g = torch.Generator().manual_seed(batch_seed(spec.seed, idx))
        if self.train and self.images is not None and torch.rand((), generator=g).item() < spec.image_ratio:
            out = {"x": self.images.group(len(idx), batch_seed(spec.seed + 1, idx)),
                   "is_image": torch.ones(len(idx), dtype=torch.bool)}
            if spec.has_captions:
                out["caption"] = [""] * len(idx)
            return out
        clips, caps = [], []
        for i in idx:
            src, name, caption = self.source(i)
            pos = torch.rand((), generator=g).item() if self.train else spec.val_position
            clip = decode_clip(src, name, spec.frames, spec.stride, spec.fps, pos, spec.resize, spec.pad_short)
            oy, ox = crop_offsets(clip.shape[-2], clip.shape[-1], spec.image_size, 1,
                                  random=self.train and spec.crop == "random", generator=g)
            clips.append(clip[..., int(oy) : int(oy) + spec.image_size, int(ox) : int(ox) + spec.image_size])
            caps.append(caption)
        out = {"x": torch.stack(clips), "is_image": torch.zeros(len(idx), dtype=torch.bool)}
        if spec.has_captions:
            out["caption"] = caps
        return out

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def videos_only(self) -> VideoFiles:
        return VideoFiles(self.spec, self.items, self.captions, train=False)


class VideoFileDataModule(VideoDataModule):
    """See the module docstring. source=folder: `path` is a folder of video files (every file with a video
    extension, or the rows of the `captions` table: WebVid's layout, path + caption; `files` keeps a subset);
    source=hf: `path` is a Hugging Face dataset (hub name, or a local save_to_disk / parquet folder) whose
    `video_key` column holds a file path (relative to `video_root`), the file's bytes or a {path, bytes}
    record, captions in `caption_key`. Held-out videos: `val_captions` (a second table) / `val_split`, or a
    fixed `val_fraction` of the list. clips_per_video: training clips (random starts) drawn from each video per
    epoch (small folders)."""

    def __init__(self, path: str, frames: int, image_size: int, source: str = "folder", stride: int = 1,
                 fps: float | None = None, resize: int | None = None, captions: str | None = None,
                 val_captions: str | None = None, path_format: str = "{path}", caption_key: str | None = "caption",
                 val_fraction: float = 0.0, val_position: float = 0.0, pad_short: bool = False,
                 train_split: str = "train", val_split: str | None = None, video_key: str = "video",
                 video_root: str | None = None, check_files: bool = True, path_env: str = "AEFORGE_DATA_DIR",
                 files: list[str] | None = None, clips_per_video: int = 1, **kwargs):
        super().__init__(frames=frames, image_size=image_size, **kwargs)
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}; valid: {list(SOURCES)}")
        if fps is not None and stride != 1:
            raise ValueError(f"data.fps={fps} and data.stride={stride} both set the frame spacing; set one")
        if (fps is not None and fps <= 0) or stride < 1:
            raise ValueError(f"data.fps must be > 0 and data.stride >= 1, got fps={fps}, stride={stride}")
        if resize is not None and resize < image_size:
            raise ValueError(f"data.resize={resize} is smaller than the crop data.image_size={image_size}")
        if clips_per_video < 1:
            raise ValueError(f"data.clips_per_video={clips_per_video} must be >= 1")
        if files is not None and source != "folder":
            raise ValueError("data.files picks videos of a folder (source=folder); a dataset lists its own rows")
        if not 0 <= val_position <= 1:
            raise ValueError(f"data.val_position={val_position} must be in [0, 1] (where in the video clips start)")
        held_out = val_captions if source == "folder" else val_split
        if bool(held_out) == (val_fraction > 0):
            which = "data.val_captions" if source == "folder" else "data.val_split"
            raise ValueError(f"give the held-out videos one way: {which} (now {held_out!r}) or data.val_fraction "
                             f"(now {val_fraction}) — exactly one of them")
        check_local_or_hub(path, path_env)
        self.path, self.source_kind, self.stride, self.fps = path, source, stride, fps
        self.resize, self.val_position, self.pad_short = resize or image_size, val_position, pad_short
        self.caption_key, self.video_key, self.clips_per_video = caption_key, video_key, clips_per_video
        if source == "folder":
            root = Path(path).expanduser()
            train, caps = self._folder_items(root, captions, path_format, caption_key, check_files)
            if files is not None:  # a subset of the folder's (or the table's) videos, in the table's order
                unknown = [f for f in files if f not in train]
                if unknown:
                    raise DataFileError(f"data.files {unknown} are not among the videos of {captions or root}; it "
                                        f"has {train}")
                keep = [i for i, f in enumerate(train) if f in set(files)]
                train, caps = [train[i] for i in keep], [caps[i] for i in keep] if caps is not None else None
            if val_captions:
                val, vcaps = self._folder_items(root, val_captions, path_format, caption_key, check_files)
            else:
                train, caps, val, vcaps = self._split(train, caps, val_fraction)
            self.root, self.has_captions = root, caps is not None
        else:
            import datasets

            p = Path(path).expanduser()
            ds = datasets.load_from_disk(str(p)) if (p / "dataset_dict.json").exists() else datasets.load_dataset(
                str(p) if p.exists() else path)
            for split in filter(None, (train_split, val_split)):
                if split not in ds:
                    raise DataFileError(f"dataset {path} has splits {list(ds)}, not {split!r}")
            tr = ds[train_split]
            if video_key not in tr.column_names:
                raise DataFileError(f"dataset {path} has no column data.video_key={video_key!r}; it has "
                                    f"{tr.column_names}")
            if isinstance(tr.features[video_key], datasets.Video):  # keep the file: PyAV decodes it, not datasets
                ds = ds.cast_column(video_key, datasets.Video(decode=False))
            self.root = Path(video_root).expanduser() if video_root else (p if p.is_dir() else None)
            self.has_captions = caption_key is not None and caption_key in tr.column_names
            train, caps, vcaps = list(range(len(ds[train_split]))), None, None  # HF captions: read from the rows
            self.hf = {"train": ds[train_split], "val": ds[val_split] if val_split else ds[train_split]}
            if val_split:
                val = list(range(len(self.hf["val"])))
            else:
                train, _, val, _ = self._split(train, None, val_fraction)
            train, val = [("train", i) for i in train], [("val", i) for i in val]
        if not train or not val:
            raise DataFileError(f"data.path={path}: {len(train)} training and {len(val)} held-out videos; both "
                                f"need at least one")
        if source == "folder":
            self.hf = None
        spec = ClipSource(self)
        self.train_set = VideoFiles(spec, train, caps, train=True, images=self._images())
        self.val_set = VideoFiles(spec, val, vcaps, train=False)

    def _folder_items(self, root: Path, table: str | None, path_format: str, caption_key: str | None,
                      check: bool) -> tuple[list[str], list[str] | None]:
        if table is None:
            files = sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.suffix.lower() in VIDEO_EXTS)
            if not files:
                raise DataFileError(f"data.path={root}: no video files ({', '.join(VIDEO_EXTS)})")
            return files, None
        paths, caps = read_table(table, path_format, caption_key)
        if check:
            gone = [p for p in paths if not (root / p).is_file()]
            if gone:
                raise missing_file(root / gone[0]) if len(gone) == 1 else DataFileError(
                    f"{len(gone)} videos of {table} are not under data.path={root}, e.g. {gone[:3]} (check "
                    f"data.path_format={path_format!r})")
        return paths, caps

    def _split(self, items: list, caps: list | None, fraction: float):
        """A fixed, seeded hold-out of `fraction` of the items (at least one)."""
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(1234)).tolist()
        n_val = max(1, int(len(items) * fraction))
        pick = lambda ix, xs: [xs[i] for i in sorted(ix)] if xs is not None else None  # noqa: E731
        return pick(perm[n_val:], items), pick(perm[n_val:], caps), pick(perm[:n_val], items), pick(perm[:n_val], caps)

    def _images(self) -> ImageFrames | None:
        if self.images_source is None:
            return None
        if self.images_source == "frames":
            raise ValueError("data.images=frames reads the frames of in-memory clips (data=video_clips); here give a "
                             "folder of image files or an .npz with x (N, H, W, 3)")
        p = Path(self.images_source).expanduser()
        if p.is_dir():
            return ImageFrames(load_image_folder(p, self.image_size), self.image_frames)
        if not p.is_file():
            raise missing_file(p)
        stills = self.load_images([torch.zeros(3, 1, self.image_size, self.image_size, dtype=torch.uint8)])
        return stills
