"""The frozen per-frame image VAE of Hi-VAE (card 1): frames in [-1, 1] -> scaled latents and back.

Sources (`source=`):
- `diffusers:<folder>`: a diffusers `AutoencoderKL` saved with `save_pretrained` (e.g. a local copy of
  stabilityai/sd-vae-ft-mse, the card's VAE), read offline; its `scaling_factor` (0.18215) unless given.
- `aeforge:<checkpoint>`: the offline stand-in, an image VAE trained by aeforge (`experiment=
  hi_vae_image_vae_clips`, model `aeforge.models.hi_vae.FrameKLVAE`); its architecture comes from the run's
  `.hydra/config.yaml` beside the checkpoint, its scaling factor is 1 / the latent std it measured in training.
- `random`: the architecture given here (default: SD-VAE's, 83.7 M parameters) with random weights, for smoke
  runs and tests only: it logs a warning saying so.
Always frozen and in eval mode (`FrozenModule`), never in the optimiser; `encode` uses the posterior mean
unless `sample_posterior` (the reference samples; the mean makes reconstructions deterministic)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from aeforge.nn.frozen import FrozenModule

log = logging.getLogger(__name__)

SOURCES = ("diffusers:<folder>", "aeforge:<checkpoint>", "random")


def build_autoencoder_kl(block_out_channels: list[int], latent_channels: int, layers_per_block: int,
                         norm_num_groups: int, in_channels: int = 3) -> nn.Module:
    """A diffusers AutoencoderKL (the SD-VAE family), downsampling 2^(len(block_out_channels) - 1)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                         block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         norm_num_groups=norm_num_groups)


def _aeforge_vae(path: str) -> tuple[nn.Module, float]:
    from omegaconf import OmegaConf

    from aeforge.checkpoints import check_checkpoint, load_checkpoint
    from aeforge.models.base import model_state_dict

    ckpt = Path(path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    cfg_file = run_dir / ".hydra" / "config.yaml"
    what = f"image_vae.source=aeforge:{path}"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{what}: the run config {cfg_file} is missing (it gives the architecture); train "
                                f"the stand-in with `python train.py experiment=hi_vae_image_vae_clips` and pass "
                                f"model.image_vae=aeforge:<that run>/checkpoints/last.ckpt")
    check_checkpoint(ckpt, what=what)
    model_cfg = OmegaConf.load(cfg_file).model
    if not str(model_cfg.get("_target_", "")).endswith("FrameKLVAE"):
        raise ValueError(f"{what}: that run trained {model_cfg.get('_target_')}, not aeforge.models.hi_vae.FrameKLVAE")
    vae = build_autoencoder_kl(list(model_cfg.block_out_channels), int(model_cfg.latent_channels),
                               int(model_cfg.layers_per_block), int(model_cfg.norm_num_groups))
    state = model_state_dict(load_checkpoint(ckpt, what=what))
    vae.load_state_dict({k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")})
    std = float(state["latent_std"]) if "latent_std" in state else 1.0
    return vae, 1.0 / max(std, 1e-6)


class FrozenImageVAE(FrozenModule):
    """Per-frame frozen image VAE. `encode(x (N, 3, H, W) in [-1, 1]) -> (N, c, H/f, W/f)` scaled latents,
    `decode(z) -> (N, 3, H, W)`, in chunks of `chunk` frames (bounded memory on long clips). Architecture
    arguments apply to `source=random` only (the other sources carry their own)."""

    def __init__(self, source: str = "random", scaling_factor: float | None = None, sample_posterior: bool = False,
                 chunk: int = 32, block_out_channels: list[int] = (128, 256, 512, 512), latent_channels: int = 4,
                 layers_per_block: int = 2, norm_num_groups: int = 32):
        super().__init__()
        kind, _, where = source.partition(":")
        if kind == "diffusers" and where:
            from diffusers import AutoencoderKL

            if not Path(where).is_dir():
                raise FileNotFoundError(f"image_vae.source={source!r}: no such folder (a diffusers AutoencoderKL "
                                        f"saved with save_pretrained, e.g. a local copy of sd-vae-ft-mse)")
            self.vae = AutoencoderKL.from_pretrained(where, local_files_only=True)
            scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        elif kind == "aeforge" and where:
            self.vae, scale = _aeforge_vae(where)
        elif source == "random":
            log.warning("image_vae.source=random: the frozen image VAE has RANDOM weights (smoke runs and tests "
                        "only); give diffusers:<folder> or aeforge:<checkpoint> for real latents")
            self.vae = build_autoencoder_kl(list(block_out_channels), latent_channels, layers_per_block,
                                            norm_num_groups)
            scale = 0.18215
        else:
            raise ValueError(f"image_vae.source={source!r} is not one of {list(SOURCES)}")
        self.scaling_factor = float(scaling_factor) if scaling_factor is not None else scale
        self.sample_posterior, self.chunk = sample_posterior, chunk
        self.vae.requires_grad_(False)
        self.eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"frames of {height}x{width} px are not divisible by the image VAE's downsampling "
                             f"factor {self.downsample}")
        return self.latent_channels, height // self.downsample, width // self.downsample

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.latent_shape(*x.shape[-2:])
        out = []
        for part in x.split(self.chunk):
            dist = self.vae.encode(part).latent_dist
            out.append(dist.sample() if self.sample_posterior else dist.mean)
        return torch.cat(out) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.vae.decode(part / self.scaling_factor).sample for part in z.split(self.chunk)])
