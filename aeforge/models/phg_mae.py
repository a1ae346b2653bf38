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

- Distillation (`PHGDistill`): an RGB-only student with the same channel-stack I/O (every non-RGB block zero,
  as the released students) learns the frozen teacher's K-mask ensemble probabilities [OPEN: the paper's
  distillation loss; aeforge: cross-entropy to the soft targets, DistillLoss].

- Semi-supervision (`PseudoLabelRounds`, a callback): every N epochs the model's K-mask ensemble labels the
  unlabelled training frames; later epochs train on those maps as targets, as on labelled frames.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from aeforge.data.images import DataFileError, load_npz, random_resized_crop_flip
from aeforge.data.loading import ResumableLoader, _identity
from aeforge.models.base import AutoencoderModel, model_state_dict
from aeforge.nn.frozen import FrozenModule
from aeforge.objectives.multimodal import NO_LABEL

log = logging.getLogger("aeforge")

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


def load_phg_mae(path: str, input_shape, modalities: list[str], num_semantic: int, keep_prob: float = 0.5,
                 target: str = "semantic") -> PHGMAE:
    """A trained PHGMAE from an aeforge checkpoint (Lightning `.ckpt`, `model.*` keys) or a bare state dict;
    its width is read from the weights."""
    state = model_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    first = "net.stages.0.0.0.weight"
    if first not in state:
        raise ValueError(f"{path} is not a PHG-MAE checkpoint (no {first!r}); train a teacher with "
                         f"`python train.py experiment=phg_mae_multimodal`")
    model = PHGMAE(tuple(input_shape), modalities, num_semantic, width=state[first].shape[0], keep_prob=keep_prob,
                   target=target)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # other channel counts or keys: another modality list
        raise ValueError(f"{path}: its PHG-MAE does not match modalities {modalities} / num_semantic "
                         f"{num_semantic}: {str(e).splitlines()[1].strip()}") from None
    return model


class FrozenPHGMAE(FrozenModule):
    def __init__(self, model: PHGMAE):
        super().__init__()
        self.model = model.eval().requires_grad_(False)


class PHGDistill(PHGMAE):
    """PHG-MAE distillation: an RGB-only student (a PHGMAE whose every mask keeps RGB alone, so the non-RGB
    input blocks are always zero: the released students' I/O) trained on a frozen teacher's K-mask ensemble
    probabilities of the target modality. outputs: pred, keep, soft (B, num_semantic, H, W) = the teacher's.

    teacher_checkpoint: a PHGMAE run's checkpoint (`experiment=phg_mae_multimodal`); null is refused unless
    allow_random (debug=smoke sets it), which stands in a random teacher with a warning."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        modalities: list[str],
        num_semantic: int = 8,
        width: int = 4,
        dropout: float = 0.0,
        teacher_checkpoint: str | None = None,
        teacher_keep_prob: float = 0.5,
        teacher_k: int = 8,
        teacher_mode: str = "random",
        allow_random: bool = False,
        target: str = "semantic",
    ):
        super().__init__(input_shape, modalities, num_semantic, width, dropout, keep_prob=0.0,
                         always_keep=["rgb"], target=target)
        if teacher_mode not in ("random", "all", "rgb"):
            raise ValueError(f"teacher_mode must be random, all or rgb, got {teacher_mode!r}")
        if teacher_checkpoint is None:
            if not allow_random:
                raise ValueError("model.teacher_checkpoint is null: distillation needs a trained PHG-MAE. Train one "
                                 "with `python train.py experiment=phg_mae_multimodal` and pass "
                                 "model.teacher_checkpoint=<run dir>/checkpoints/last.ckpt")
            log.warning("model.teacher_checkpoint=null with allow_random=true (debug=smoke sets it): the student "
                        "learns a RANDOMLY INITIALISED teacher; for plumbing checks only, never for results.")
            teacher = PHGMAE(input_shape, modalities, num_semantic, keep_prob=teacher_keep_prob, target=target)
        else:
            teacher = load_phg_mae(str(teacher_checkpoint), input_shape, list(modalities), num_semantic,
                                   teacher_keep_prob, target)
        self.teacher = FrozenPHGMAE(teacher)
        self.teacher_k, self.teacher_mode = teacher_k, teacher_mode

    def test_mask(self, batch_size: int, device, generator=None, mode: str = "random") -> torch.Tensor:
        return super().test_mask(batch_size, device, mode="rgb")  # the student reads RGB only, whatever the mode

    def forward(self, batch):
        out = super().forward(batch)
        out["soft"] = self.teacher.model.predict_semantic(batch, k=self.teacher_k, mode=self.teacher_mode)
        return out


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


def semantic_one_hot(sem: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, n, H, W) float one-hot; NO_LABEL pixels (ignored by the loss) are all zero."""
    known = sem != NO_LABEL
    return (F.one_hot(sem * known, n).permute(0, 3, 1, 2) * known[:, None]).float()


class _Frames(torch.utils.data.Dataset):
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
            _Frames(tr, labeled, pseudo=not bool(labeled.all())),
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


class PseudoLabelRounds(pl.Callback):
    """PHG-MAE semi-supervision [A: "pseudo-labels from the ensemble on unlabeled frames"; schedule OPEN]:
    at the end of every `every_n_epochs`-th epoch the model's K-mask ensemble (`predict_semantic`, k, mode)
    labels every unlabelled training frame; the following epochs use those maps as targets (and as the
    maskable semantic input) like labelled frames. 0 turns it off; data with every frame labelled has
    nothing to do. Pixels whose ensemble probability is below `min_confidence` stay unlabelled (ignored by
    the loss; 0 keeps every pixel). Logs pseudo/acc (agreement of the kept pixels with the true maps, known
    here: the target is procedural) and pseudo/coverage (fraction of pixels kept). The maps travel in
    checkpoints, so a resumed run keeps them."""

    def __init__(self, every_n_epochs: int = 10, k: int = 16, mode: str = "random", min_confidence: float = 0.0,
                 batch_size: int = 64, seed: int = 0):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: off), got {every_n_epochs}")
        if not 0 <= min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        self.every, self.k, self.mode, self.batch_size, self.seed = every_n_epochs, k, mode, batch_size, seed
        self.min_confidence = min_confidence
        self._restored: torch.Tensor | None = None
        self._last: _Frames | None = None

    @staticmethod
    def _frames(trainer) -> _Frames | None:
        ds = getattr(trainer.datamodule, "train_set", None)
        return ds if isinstance(ds, _Frames) and ds.pseudo is not None else None

    def on_train_start(self, trainer, pl_module):
        ds = self._frames(trainer)
        if ds is not None and self._restored is not None:
            ds.pseudo.copy_(self._restored)
        self._restored = None

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module):
        ds = self._frames(trainer)
        if not self.every or ds is None or (trainer.current_epoch + 1) % self.every:
            return
        dm, model, dev = trainer.datamodule, pl_module.model, pl_module.device
        idx = (~ds.labeled.bool()).nonzero().flatten()
        # the same masks on every rank (identical weights after the step): the ranks write identical maps
        g = torch.Generator(device=dev).manual_seed(self.seed + trainer.current_epoch)
        was_training = model.training
        model.eval()
        agree = kept = 0
        try:
            for chunk in idx.split(self.batch_size):
                batch = dm.make(ds.frames[chunk].to(dev))
                conf, pred = model.predict_semantic(batch, k=self.k, mode=self.mode, generator=g).max(1)
                keep = conf >= self.min_confidence
                ds.pseudo[chunk] = torch.where(keep, pred, NO_LABEL).to(torch.uint8).cpu()
                agree += (keep & (pred == batch["sem"])).sum().item()
                kept += keep.sum().item()
        finally:
            model.train(was_training)
        acc, coverage = agree / max(kept, 1), kept / max(ds.pseudo[idx].numel(), 1)
        pl_module.log_dict({"pseudo/acc": acc, "pseudo/coverage": coverage}, sync_dist=False)
        log.info("pseudo-labels: %d unlabelled frames relabelled by a %d-mask ensemble: %.3f of the pixels kept "
                 "(confidence >= %g), agreeing with the true maps on %.3f", len(idx), self.k, coverage,
                 self.min_confidence, acc)

    def state_dict(self) -> dict:
        return {"pseudo": self._last.pseudo.clone()} if self._last is not None else {}

    def setup(self, trainer, pl_module, stage: str):
        self._last = self._frames(trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("pseudo")


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
