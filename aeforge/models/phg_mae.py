"""PHG-MAE (Pîrvu & Leordeanu, arXiv 2510.10068): multi-modal masked autoencoding, whole modalities masked.

- Every modality of a scene (RGB and maps derived from it; here procedural "experts": Sobel edges, HSV
  saturation/value, a blurred-luminance map, and an 8-class colour segmentation as the downstream target)
  is a block of channels in one stack; the network reads the stack and predicts all of it.
- Training masks **entire modalities** (zero-filled channel blocks) per sample: each non-RGB modality is
  kept with probability `keep_prob`, RGB always [OPEN: the paper's hyperedge distribution]. Each mask is one
  hyperedge. Pre-training and fine-tuning are one loop: the semantic map is just another output, trained
  with cross-entropy on labelled frames (semi-supervised: `labeled_fraction`) while the other modalities
  get L1 [OPEN] (aeforge/objectives/multimodal.py).
- Inference: K modality masks of the same input (the target semantic map always masked) give K semantic
  predictions whose softmax probabilities are averaged (`predict_semantic`).
- Backbone: a SafeUAV-style UNet (three conv stages, six summed dilated bottleneck convs, transposed-conv
  decoder with skips), the architecture of the released distilled students [OPEN for the main model].

Not done: pseudo-label refresh rounds and the distilled RGB-only student (see docs/methods/phg_mae.md).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from aeforge.data.images import DataFileError, load_npz, random_resized_crop_flip
from aeforge.data.loading import ResumableLoader, _identity
from aeforge.models.base import AutoencoderModel

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


# -- whole-modality masking -------------------------------------------------------------------------------
class ModalityMasking:
    """Per-sample keep/drop of whole modalities. `keep` is (B, M) bool in `names` order (True = given as
    input); `always_keep` modalities are never dropped, `never_input` ones are always dropped (e.g. the
    target at test time), and unlabelled samples drop `labels_from` (their target map does not exist)."""

    def __init__(
        self,
        names: list[str],
        keep_prob: float = 0.5,
        always_keep: list[str] | None = None,
        never_input: list[str] | None = None,
    ):
        if not 0.0 <= keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
        self.names, self.keep_prob = list(names), keep_prob
        self.always_keep = set(always_keep or [])
        self.never_input = set(never_input or [])

    def __call__(
        self, batch: int, device, generator: torch.Generator | None = None, drop: list[str] | None = None
    ) -> torch.Tensor:
        keep = torch.rand(batch, len(self.names), device=device, generator=generator) < self.keep_prob
        for i, name in enumerate(self.names):
            if name in self.always_keep:
                keep[:, i] = True
            if name in self.never_input or (drop and name in drop):
                keep[:, i] = False
        return keep


def apply_modality_mask(x: torch.Tensor, keep: torch.Tensor, blocks: dict[str, slice]) -> torch.Tensor:
    """Zero the channel block of every dropped modality: x (B, C, H, W), keep (B, M) in `blocks` order."""
    channel_keep = torch.cat(
        [keep[:, i : i + 1].expand(-1, s.stop - s.start) for i, s in enumerate(blocks.values())], dim=1
    )
    return x * channel_keep[:, :, None, None].to(x.dtype)


# -- backbone -------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class SafeUAVNet(nn.Module):
    """Encoder F, F, F/2 -> 2F, 2F, 2F/2 -> 4F, 4F, 4F/2 (3x3 conv + BN + ReLU); six dilated 3x3 convs of
    width 8F (dilations 1..32) applied in sequence and summed; three x2 transposed-conv ups (4F, 2F, F)
    with skip concatenation and a conv each; 1x1 conv to the output channels."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 8, dropout: float = 0.0):
        super().__init__()
        f = width
        self.stages = nn.ModuleList()
        cin = in_channels
        for w in (f, 2 * f, 4 * f):
            self.stages.append(
                nn.ModuleList(
                    [
                        _conv(cin, w, dropout=dropout),
                        _conv(w, w, dropout=dropout),
                        _conv(w, w, stride=2, dropout=dropout),
                    ]
                )
            )
            cin = w
        self.dilated = nn.ModuleList(
            _conv(4 * f if i == 0 else 8 * f, 8 * f, dilation=2**i) for i in range(6)
        )
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        cin = 8 * f
        for w in (4 * f, 2 * f, f):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.fuse.append(_conv(2 * w, w))
            cin = w
        self.out = nn.Conv2d(f, out_channels, 1)

    def forward(self, x: torch.Tensor, return_bottleneck: bool = False):
        skips = []
        for stage in self.stages:
            x = stage[1](stage[0](x))
            skips.append(x)
            x = stage[2](x)
        total = 0
        for conv in self.dilated:
            x = conv(x)
            total = total + x
        bottleneck = total
        x = total
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
            x = up(x)
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            if dh or dw:  # odd sizes: zero-pad the upsampled map
                x = F.pad(x, (0, dw, 0, dh))
            x = fuse(torch.cat([x, skip], dim=1))
        out = self.out(x)
        return (out, bottleneck) if return_bottleneck else out


class PHGMAE(AutoencoderModel):
    """Multi-modal masked autoencoder over a channel stack. batch: x (B, C, H, W) full stack (semantic as
    one-hot), sem (B, H, W) labels, optionally labeled (B,) bool. outputs: pred (B, C, H, W) (semantic block
    = logits), keep (B, M)."""

    modality = "multimodal"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        modalities: list[str],
        num_semantic: int = 8,
        width: int = 8,
        dropout: float = 0.0,
        keep_prob: float = 0.5,
        always_keep: list[str] | None = None,
        target: str = "semantic",
    ):
        super().__init__()
        self.blocks = layout(list(modalities), num_semantic)
        channels = sum(s.stop - s.start for s in self.blocks.values())
        if channels != input_shape[0]:
            raise ValueError(
                f"modalities {list(modalities)} give {channels} channels, data has {input_shape[0]}"
            )
        if target not in self.blocks:
            raise ValueError(f"target modality {target!r} is not among {list(modalities)}")
        self.target, self.num_semantic = target, num_semantic
        self.masking = ModalityMasking(list(self.blocks), keep_prob, always_keep or ["rgb"])
        self.net = SafeUAVNet(channels, channels, width, dropout)

    def forward_masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.net(apply_modality_mask(x, keep, self.blocks))

    def forward(self, batch):
        x = batch["x"]
        keep = self.masking(x.shape[0], x.device)
        if "labeled" in batch:  # frames without a target map never see it as input
            i = list(self.blocks).index(self.target)
            keep[:, i] &= batch["labeled"].bool()
        return {"pred": self.forward_masked(x, keep), "keep": keep}

    def test_mask(self, batch_size: int, device, generator=None, mode: str = "random") -> torch.Tensor:
        """Inference masks: the target is never input; mode random (drawn from pi), all (every other
        modality kept) or rgb (RGB only)."""
        names = list(self.blocks)
        if mode == "random":
            return ModalityMasking(
                names, self.masking.keep_prob, list(self.masking.always_keep), [self.target]
            )(batch_size, device, generator)
        keep = torch.ones(batch_size, len(names), dtype=torch.bool, device=device)
        for i, n in enumerate(names):
            if n == self.target or (mode == "rgb" and n != "rgb"):
                keep[:, i] = False
        return keep

    @torch.no_grad()
    def predict_semantic(self, batch, k: int = 8, mode: str = "random", generator=None) -> torch.Tensor:
        """Mean over k masks of the softmax of the target block: (B, num_semantic, H, W)."""
        x = batch["x"]
        probs = 0
        for _ in range(k):
            keep = self.test_mask(x.shape[0], x.device, generator, mode)
            probs = probs + self.forward_masked(x, keep)[:, self.blocks[self.target]].softmax(1)
        return probs / k

    def encode(self, batch):
        x = batch["x"]
        keep = self.test_mask(x.shape[0], x.device, mode="all")
        _, bottleneck = self.net(apply_modality_mask(x, keep, self.blocks), return_bottleneck=True)
        return bottleneck.mean((2, 3))

    @torch.no_grad()
    def reconstruct(self, batch) -> torch.Tensor:
        x = batch["x"]
        return self.forward_masked(x, self.test_mask(x.shape[0], x.device, mode="all"))


# -- data: derived modalities of video frames ----------------------------------------------------------------
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


class _Frames(torch.utils.data.Dataset):
    def __init__(self, frames: torch.Tensor, labeled: torch.Tensor):
        self.frames, self.labeled = frames, labeled

    def __len__(self) -> int:
        return len(self.frames)

    def __getitems__(self, idx):
        i = torch.as_tensor(idx)
        return {"x": self.frames[i], "labeled": self.labeled[i]}

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
            _Frames(tr, labeled),
            _Frames(va, torch.ones(len(va), dtype=torch.bool)),
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

    def make(self, rgb_u8: torch.Tensor, augment: bool = False) -> dict[str, torch.Tensor]:
        rgb = rgb_u8.float() / 255 if rgb_u8.dtype == torch.uint8 else rgb_u8.float()
        if augment and self.hflip:
            rgb = random_resized_crop_flip(rgb, None, True)
        maps = derive(rgb, self.names, self.centers)
        parts, out = [], {}
        for n in self.names:
            if n == "semantic":
                out["sem"] = maps[n]
                parts.append(F.one_hot(maps[n], self.num_semantic).permute(0, 3, 1, 2).float())
            else:
                m, s = self.stats[n]
                parts.append((maps[n] - m.to(rgb.device)) / s.to(rgb.device))
        out["x"] = torch.cat(parts, dim=1)
        return out

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The RGB block back to [0, 1] (for pictures)."""
        m, s = self.stats["rgb"]
        return (x[:, self.blocks["rgb"]] * s.to(x.device) + m.to(x.device)).clamp(0, 1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        training = self.trainer is not None and self.trainer.training
        if batch["x"].dtype == torch.uint8:
            batch.update(self.make(batch["x"], augment=training))
        return batch

    def _loader(self, ds, shuffle: bool):
        return ResumableLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

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


# -- evaluation --------------------------------------------------------------------------------------------
def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount((target.flatten() * n + pred.flatten()).long(), minlength=n * n).reshape(n, n)


def mean_iou(conf: torch.Tensor) -> float:
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


class SegmentationEnsembleEval:
    """Semantic mIoU on the val clip for RGB-only input, all intermediate modalities, and K-mask ensembles
    (K in `ks`); `flicker_*` = fraction of pixels whose label changes between consecutive val frames."""

    def __init__(self, ks: list[int] | None = None, seed: int = 0):
        self.ks, self.seed = list(ks or [1, 4, 16]), seed

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model, dm = ctx.model, ctx.datamodule
        n = model.num_semantic
        modes = [("rgb_only", "rgb", 1), ("all_inputs", "all", 1)] + [
            (f"ensemble_k{k}", "random", k) for k in self.ks
        ]
        conf = {name: torch.zeros(n, n, dtype=torch.long) for name, _, _ in modes}
        flips = {name: [0, 0] for name, _, _ in modes}
        prev, target_flips, last_target = {}, [0, 0], None
        g = torch.Generator(device=ctx.device).manual_seed(self.seed)
        seen = 0
        for batch in dm.eval_dataloader("val", ctx.batch_size):
            if ctx.max_samples is not None and seen >= ctx.max_samples:
                break
            seen += len(batch["x"])
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            batch.update(dm.make(batch["x"]))
            for name, mode, k in modes:
                pred = model.predict_semantic(batch, k=k, mode=mode, generator=g).argmax(1).cpu()
                conf[name] += confusion(pred, batch["sem"].cpu(), n)
                seq = torch.cat([prev[name][None], pred]) if name in prev else pred
                flips[name][0] += (seq[1:] != seq[:-1]).sum().item()
                flips[name][1] += seq[1:].numel()
                prev[name] = pred[-1]
            sem = batch["sem"].cpu()
            seq = torch.cat([last_target[None], sem]) if last_target is not None else sem
            target_flips[0] += (seq[1:] != seq[:-1]).sum().item()
            target_flips[1] += seq[1:].numel()
            last_target = sem[-1]
        out = {"flicker_target": target_flips[0] / max(target_flips[1], 1)}
        for name, _, _ in modes:
            out[f"miou_{name}"] = mean_iou(conf[name])
            out[f"flicker_{name}"] = flips[name][0] / max(flips[name][1], 1)
        return out
