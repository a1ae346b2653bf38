"""LPIPS (Zhang et al. 2018) through the `lpips` package: the perceptual term of VQGAN-style losses (cards 2, 3,
7) and the per-frame video metric evaluators reuse (`lpips_distance`).

Weights: the package ships the calibrated linear heads (lpips/weights/v0.1/<net>.pth, read from the installed
package); the backbone (torchvision VGG-16 / AlexNet / SqueezeNet-1.1 ImageNet weights) is NOT shipped and
nothing here downloads it: give its torchvision state_dict with `weights=<path>`. Without it the backbone is
random and a warning says so — then the term is a random-feature distance, not the perceptual metric (this is
what the tests use). Inputs are in [-1, 1]; 1-channel inputs are repeated to RGB; 5-D videos (B, C, T, H, W) are
scored per frame and averaged over frames.
Inputs smaller than the backbone's deepest layer allows (16 px VGG, 31 px AlexNet, 17 px SqueezeNet) are
upsampled bilinearly to that side first."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.checkpoints import load_checkpoint
from aeforge.objectives import LossTerm

log = logging.getLogger(__name__)

NETS = ("vgg", "alex", "squeeze")
# the smallest side each backbone's deepest LPIPS layer accepts (measured); smaller inputs are upsampled to it
MIN_SIDE = {"vgg": 16, "alex": 31, "squeeze": 17}


def _load_backbone(model: nn.Module, weights: str, net: str) -> None:
    """Copy a torchvision `<net>.features.N.*` state_dict into lpips' slice modules (sliceK.N.*)."""
    state = load_checkpoint(weights, what=f"LPIPS {net} backbone weights")
    state = state.get("state_dict", state)
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    target, backbone = {}, model.net
    for slice_name, block in backbone.named_children():
        for idx, _ in block.named_children():
            for key, _ in block.get_submodule(idx).named_parameters():
                if f"{idx}.{key}" in feats:
                    target[f"{slice_name}.{idx}.{key}"] = feats[f"{idx}.{key}"]
    expected = {k for k, _ in backbone.named_parameters()}
    missing = sorted(expected - set(target))
    if missing:
        raise ValueError(
            f"LPIPS weights={weights}: not a torchvision {net} state_dict (no features.* tensors for {missing[:3]}…)"
        )
    backbone.load_state_dict(target, strict=True)


def build_lpips(net: str = "vgg", weights: str | None = None) -> nn.Module:
    """A frozen lpips.LPIPS in eval mode (see the module docstring for the weights)."""
    import lpips

    if net not in NETS:
        raise ValueError(f"LPIPS net={net!r}; valid: {list(NETS)}")
    # a fixed seed, and the caller's RNG untouched: the random stand-in backbone is the same in every run, and
    # building a loss does not shift the training run's random stream
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    model.load_state_dict(load_checkpoint(heads, what="LPIPS linear heads"), strict=False)
    if weights is not None:
        _load_backbone(model, weights, net)
    else:
        log.warning(
            "LPIPS(%s) has a RANDOM backbone (no weights path given): it is a random-feature distance, not the "
            "perceptual metric. Pass the torchvision %s ImageNet state_dict as weights=<path> for real LPIPS.",
            net, net,
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_distance(a: torch.Tensor, b: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """Per-sample LPIPS of images (B, C, H, W) or videos (B, C, T, H, W, mean over frames), inputs in [-1, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"lpips_distance: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    frames = 1
    if a.ndim == 5:
        bsz, c, frames, h, w = a.shape
        a = a.transpose(1, 2).reshape(bsz * frames, c, h, w)
        b = b.transpose(1, 2).reshape(bsz * frames, c, h, w)
    elif a.ndim != 4:
        raise ValueError(f"lpips_distance takes (B, C, H, W) or (B, C, T, H, W), got {tuple(a.shape)}")
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    elif a.shape[1] != 3:
        raise ValueError(f"lpips_distance needs 1 or 3 channels, got {a.shape[1]}")
    side = MIN_SIDE.get(getattr(net, "pnet_type", ""), 1)
    if min(a.shape[-2:]) < side:  # tiny test inputs: bilinear upsampling so every LPIPS layer has a pixel
        scale = side / min(a.shape[-2:])
        size = [max(side, math.ceil(s * scale)) for s in a.shape[-2:]]
        a = F.interpolate(a.float(), size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b.float(), size=size, mode="bilinear", align_corners=False)
    d = net(a.float(), b.float()).flatten()
    return d.view(-1, frames).mean(1)


class LPIPSLoss(LossTerm):
    """weight · mean LPIPS(outputs[key_pred], batch[key_target]); the network is frozen and always in eval mode."""

    def __init__(
        self,
        weight: float = 1.0,
        net: str = "vgg",
        weights: str | None = None,
        key_pred: str = "recon",
        key_target: str = "x",
    ):
        super().__init__(weight)
        if weights is not None and not Path(weights).is_file():
            raise ValueError(f"LPIPS weights={weights!r}: no such file (a torchvision {net} state_dict)")
        self.net = build_lpips(net, weights)
        self.key_pred, self.key_target = key_pred, key_target

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # dropout of the linear heads stays off
        return self

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        return lpips_distance(outputs[self.key_pred], batch[self.key_target], self.net).mean()
