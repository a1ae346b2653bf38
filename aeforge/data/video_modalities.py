"""Frames of real videos and maps derived from them, stacked along channels: the data of PHG-MAE
(`data=video_modalities`).

Each modality (RGB and procedural "experts": Sobel edges, HSV saturation/value, blurred luminance, and an
8-colour k-means segmentation as the downstream target) is a block of channels in one stack, in the order
given by `modalities` (`layout`, shared with the model and its loss terms). The maps are derived and
standardised on the device from uint8 RGB.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from aeforge.data.images import DataFileError, load_npz, random_resized_crop_flip
from aeforge.data.loading import ResumableLoader, _identity
from aeforge.objectives.multimodal import NO_LABEL

CONTINUOUS = {"rgb": 3, "edges": 1, "hsv": 2, "blur": 1}


def layout(modalities: list[str], num_semantic: int) -> dict[str, slice]:
    """Channel block of each modality in the stacked tensor, in the listed order."""
    out, c = {}, 0
    for name in modalities:
        n = num_semantic if name == "semantic" else CONTINUOUS.get(name)
        if n is None:
            raise ValueError(f"unknown modality {name!r}; valid: {[*CONTINUOUS, 'semantic']}")
        out[name] = slice(c, c + n)
        c += n
    return out


def sobel_edges(gray: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=gray.device)
    k = torch.stack([kx, kx.T]).unsqueeze(1)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1, keepdim=True).sqrt()


def box_blur(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)


def derive(rgb: torch.Tensor, names: list[str], centers: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """rgb (B, 3, H, W) in [0, 1] -> raw (un-standardised) derived maps; semantic as int labels (B, H, W)."""
    out = {}
    gray = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    for n in names:
        if n == "rgb":
            out[n] = rgb
        elif n == "edges":
            out[n] = sobel_edges(gray)
        elif n == "hsv":
            mx, mn = rgb.amax(1, keepdim=True), rgb.amin(1, keepdim=True)
            out[n] = torch.cat([(mx - mn) / mx.clamp_min(1e-6), mx], dim=1)
        elif n == "blur":
            out[n] = box_blur(gray, 4)
        elif n == "semantic":
            if centers is None:
                raise RuntimeError("semantic map needs colour centres (fit on the training frames first)")
            colours = box_blur(rgb, 1).permute(0, 2, 3, 1)  # (B, H, W, 3)
            out[n] = torch.cdist(colours.reshape(-1, 3), centers.to(rgb)).argmin(1).reshape(colours.shape[:3])
    return out


def kmeans(points: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = points[torch.randperm(len(points), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(points, centers).argmin(1)
        for j in range(k):
            sel = points[assign == j]
            if len(sel):
                centers[j] = sel.mean(0)
    return centers[centers.sum(1).argsort()]  # dark -> bright, so class ids are stable


def semantic_one_hot(sem: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, n, H, W) float one-hot; NO_LABEL pixels (ignored by the loss) are all zero."""
    known = sem != NO_LABEL
    return (F.one_hot(sem * known, n).permute(0, 3, 1, 2) * known[:, None]).float()


class VideoFrames(torch.utils.data.Dataset):
    """uint8 frames + `labeled` flags; with pseudo=True also a (N, H, W) uint8 map per frame for pseudo-labels
    (NO_LABEL until PseudoLabelRounds writes it), in shared memory so loader workers see the updates."""

    def __init__(self, frames: torch.Tensor, labeled: torch.Tensor, pseudo: bool = False):
        self.frames, self.labeled = frames, labeled
        n, _, h, w = frames.shape
        self.pseudo = torch.full((n, h, w), NO_LABEL, dtype=torch.uint8).share_memory_() if pseudo else None

    def __len__(self) -> int:
        return len(self.frames)

    def __getitems__(self, idx):
        i = torch.as_tensor(idx)
        out = {"x": self.frames[i], "labeled": self.labeled[i]}
        if self.pseudo is not None:
            out["pseudo"] = self.pseudo[i]
        return out

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class VideoModalitiesDataModule(pl.LightningDataModule):
    """Frames of real videos (${paths.data_dir}/videos/videos_64px.npz) and maps derived from them, stacked
    in `modalities` order. Batches travel as uint8 RGB; `normalize` derives and standardises the modalities
    on the device. Train/val are different clips (an unseen scene, as Dronescapes' test scenes).
    The semantic target is an 8-colour k-means segmentation fitted on the training frames (a procedural
    stand-in for an expert segmenter), kept as labels in batch["sem"] and one-hot in the stack."""

    modality = "multimodal"

    def __init__(
        self,
        path: str,
        modalities: list[str],
        train_clips: list[str],
        val_clips: list[str],
        num_semantic: int = 8,
        image_size: int = 64,
        labeled_fraction: float = 1.0,
        hflip: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.names, self.num_semantic = list(modalities), num_semantic
        self.blocks = layout(self.names, num_semantic)
        self.batch_size, self.num_workers, self.seed, self.hflip = batch_size, num_workers, seed, hflip
        arrays = load_npz(path, ())
        missing = [c for c in [*train_clips, *val_clips] if c not in arrays]
        if missing:
            raise DataFileError(
                f"{path} has no clips {missing}; it has {sorted(k for k in arrays if '_' not in k)}"
            )

        def frames(names):
            x = torch.from_numpy(np.concatenate([arrays[c] for c in names])).permute(0, 3, 1, 2).contiguous()
            if image_size != x.shape[-1]:
                x = (
                    F.interpolate(x.float(), size=(image_size, image_size), mode="area")
                    .round()
                    .to(torch.uint8)
                )
            return x

        tr, va = frames(train_clips), frames(val_clips)
        g = torch.Generator().manual_seed(1234)
        labeled = torch.rand(len(tr), generator=g) < labeled_fraction
        self.train_set, self.val_set = (
            VideoFrames(tr, labeled, pseudo=not bool(labeled.all())),
            VideoFrames(va, torch.ones(len(va), dtype=torch.bool)),
        )
        sample = tr[torch.randperm(len(tr), generator=g)[:200]].float() / 255
        px = box_blur(sample, 1).permute(0, 2, 3, 1).reshape(-1, 3)
        px = px[torch.randperm(len(px), generator=g)[:50000]]
        self.centers = kmeans(px, num_semantic, seed=seed) if "semantic" in self.names else None
        raw = derive(sample, [n for n in self.names if n != "semantic"], self.centers)
        self.stats = {
            n: (v.mean((0, 2, 3)).view(1, -1, 1, 1), v.std((0, 2, 3)).view(1, -1, 1, 1).clamp_min(1e-6))
            for n, v in raw.items()
        }
        channels = sum(s.stop - s.start for s in self.blocks.values())
        self.input_shape = (channels, image_size, image_size)
        self.num_classes = None  # no image-level labels: the probes skip; eval=phg_mae measures segmentation

    def normalize(self, x: torch.Tensor, augment: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
        return self.make(x, augment)["x"]

    def make(self, rgb_u8: torch.Tensor, augment: bool = False, pseudo: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        """x (the standardised stack, semantic one-hot) and sem (B, H, W) from uint8 RGB. pseudo (B, H, W):
        pseudo-label maps, flipped with the frames; where a map is written and the frame is unlabelled,
        on_after_batch_transfer swaps it in as the target."""
        rgb = rgb_u8.float() / 255 if rgb_u8.dtype == torch.uint8 else rgb_u8.float()
        if augment and self.hflip:
            if pseudo is not None:  # an exact flip moves label values unchanged (grid points on pixel centres)
                both = random_resized_crop_flip(torch.cat([rgb, pseudo[:, None].float()], 1), None, True)
                rgb, pseudo = both[:, :3], both[:, 3].round().to(torch.uint8)
            else:
                rgb = random_resized_crop_flip(rgb, None, True)
        maps = derive(rgb, self.names, self.centers)
        parts, out = [], {}
        for n in self.names:
            if n == "semantic":
                out["sem"] = maps[n]
                parts.append(semantic_one_hot(maps[n], self.num_semantic))
            else:
                m, s = self.stats[n]
                parts.append((maps[n] - m.to(rgb.device)) / s.to(rgb.device))
        out["x"] = torch.cat(parts, dim=1)
        if pseudo is not None:
            out["pseudo"] = pseudo
        return out

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The RGB block back to [0, 1] (for pictures)."""
        m, s = self.stats["rgb"]
        return (x[:, self.blocks["rgb"]] * s.to(x.device) + m.to(x.device)).clamp(0, 1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        training = self.trainer is not None and self.trainer.training
        if batch["x"].dtype == torch.uint8:
            batch.update(self.make(batch["x"], augment=training, pseudo=batch.pop("pseudo", None)))
        pseudo = batch.pop("pseudo", None)
        if pseudo is not None and "semantic" in self.blocks:
            use = ~batch["labeled"].bool() & (pseudo != NO_LABEL).flatten(1).any(1)
            if use.any():  # pseudo-labelled frames train like labelled ones: target and (maskable) input
                sem = torch.where(use[:, None, None], pseudo.long(), batch["sem"])
                one_hot = semantic_one_hot(sem, self.num_semantic).to(batch["x"].dtype)
                batch["x"] = torch.cat([batch["x"][:, : self.blocks["semantic"].start], one_hot,
                                        batch["x"][:, self.blocks["semantic"].stop :]], dim=1)
                batch["sem"], batch["labeled"] = sem, batch["labeled"].bool() | use
        return batch

    def _loader(self, ds, shuffle: bool):
        return ResumableLoader(ds, batch_size=self.batch_size, shuffle=shuffle, seed=self.seed,
                               num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def eval_dataloader(self, split: str, batch_size: int):
        ds = {"train": self.train_set, "val": self.val_set}[split]
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=self.num_workers, collate_fn=_identity
        )

    def describe(self) -> str:
        return f"VideoModalitiesDataModule({dict((k, s.stop - s.start) for k, s in self.blocks.items())})"
