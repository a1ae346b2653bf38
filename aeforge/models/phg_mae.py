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

- Semi-supervision (`PseudoLabelRounds`, aeforge/callbacks/pseudo_labels.py): every N epochs the model's
  K-mask ensemble labels the unlabelled training frames; later epochs train on those maps as targets, as on
  labelled frames.

The data (the channel stack and its `layout`) is aeforge/data/video_modalities.py, the segmentation evaluator
aeforge/eval/segmentation.py and the frozen teacher of distillation aeforge/targets/teachers.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.checkpoints import load_checkpoint
from aeforge.data.video_modalities import layout
from aeforge.models.base import AutoencoderModel, model_state_dict
from aeforge.targets.teachers import FrozenPHGMAE

log = logging.getLogger("aeforge")


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
    state = model_state_dict(load_checkpoint(path, what="model.teacher_checkpoint"))
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
