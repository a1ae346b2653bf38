"""RAE — Diffusion Transformers with Representation Autoencoders (Zheng, Ma, Tong, Xie, 2025), stage 1.

A frozen pretrained representation encoder (aeforge/targets/encoders.py: DINOv2-B with registers by default;
CLS and registers dropped, final LayerNorm without its affine) gives patch tokens z (B, N, D); only a ViT
decoder is trained to map them back to pixels (L1 + LPIPS + GAN, conf/objective/rae.yaml, module=gan).

* Decoder (ViT-MAE style): linear D -> width, fixed 2-D sin-cos positions, transformer blocks, LayerNorm, linear
  to p*p*C pixels per token, unpatchify; presets B 768/12/12/3072, L 1024/24/16/4096, XL 1152/28/16/4096.
* Noise augmentation (training only) on the raw tokens: z + σ·n, n ~ N(0, I), σ = τ·U(0, 1) per sample
  (`noise="uniform"`, the code's) or σ = |N(0, τ²)| (`noise="halfnormal"`, the paper text's); τ = 0.8.
  It makes the decoder tolerate the imperfect latents a generator produces.
* Latent normalisation for generators: per-(token, channel) mean and variance over the training data
  (`LatentNorm` buffers, filled once by the `rae_latent_stats` stage, saved in the checkpoint):
  `latents(x)` gives normalised tokens, `decode_latents` undoes the normalisation and decodes.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn.vit import LayerNorm, init_weights, sincos_2d, unpatchify
from aeforge.targets.encoders import FrozenEncoder, LatentNorm

# width, depth, heads, MLP hidden (card 2, the released decoder configs)
DECODER_PRESETS = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096), "XL": (1152, 28, 16, 4096)}
NOISE = ("uniform", "halfnormal")


class ViTDecoder(nn.Module):
    """Tokens (B, N, D) on a `grid` -> images (B, C, grid*patch, grid*patch)."""

    def __init__(self, in_dim: int, grid: tuple[int, int], patch_size: int, channels: int, width: int, depth: int,
                 heads: int, mlp: int):
        super().__init__()
        self.grid, self.patch_size, self.channels = tuple(grid), patch_size, channels
        self.embed = nn.Linear(in_dim, width)
        self.register_buffer("pos", sincos_2d(width, self.grid)[None], persistent=False)
        # + 0.5: timm's Block takes int(width * ratio), which float error could round one below `mlp`
        self.blocks = nn.ModuleList(Block(width, heads, (mlp + 0.5) / width, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(depth))
        self.norm = LayerNorm(width)
        self.pred = nn.Linear(width, patch_size * patch_size * channels)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.embed(z) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return unpatchify(self.pred(self.norm(h)), self.patch_size, self.grid, self.channels)


class RAE(AutoencoderModel):
    """Frozen encoder + trained ViT decoder. Images in the data's normalisation; for the LPIPS/GAN terms and the
    generation contract that is [-1, 1] (data.mean = data.std = 0.5 in the RAE recipes)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        encoder: str = "hf:facebook/dinov2-with-registers-base",
        encoder_input_size: int | None = 224,
        drop_prefix_tokens: bool = True,
        strip_final_norm_affine: bool = True,
        missing_weights: str = "error",
        encoder_kwargs: dict | None = None,
        data_mean: list[float] | None = None,
        data_std: list[float] | None = None,
        decoder: str = "XL",
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        decoder_mlp: int | None = None,
        patch_size: int = 16,
        noise_tau: float = 0.8,
        noise: str = "uniform",
        stats_eps: float = 1e-5,
    ):
        super().__init__()
        if decoder not in DECODER_PRESETS:
            raise ValueError(f"model.decoder={decoder!r}; valid presets {sorted(DECODER_PRESETS)} (override single "
                             f"sizes with decoder_width/decoder_depth/decoder_heads/decoder_mlp)")
        if noise not in NOISE:
            raise ValueError(f"model.noise={noise!r}; valid choices {list(NOISE)}")
        c, h, w = input_shape
        self.input_shape, self.noise_tau, self.noise = tuple(input_shape), noise_tau, noise
        self.encoder = FrozenEncoder(encoder, drop_prefix_tokens=drop_prefix_tokens,
                                     strip_final_norm_affine=strip_final_norm_affine, input_size=encoder_input_size,
                                     data_mean=data_mean, data_std=data_std, missing_weights=missing_weights,
                                     model_kwargs=encoder_kwargs)
        grid = self.encoder.grid
        if (grid[0] * patch_size, grid[1] * patch_size) != (h, w):
            raise ValueError(f"the encoder's {grid[0]}x{grid[1]} token grid x model.patch_size={patch_size} gives "
                             f"{grid[0] * patch_size}x{grid[1] * patch_size} images, the data's are {h}x{w}: set "
                             f"model.patch_size={h // grid[0]} or change model.encoder_input_size / the data size")
        width, depth, heads, mlp = DECODER_PRESETS[decoder]
        self.decoder = ViTDecoder(self.encoder.dim, grid, patch_size, c, decoder_width or width,
                                  decoder_depth or depth, decoder_heads or heads, decoder_mlp or mlp)
        self.latent_norm = LatentNorm(self.encoder.num_tokens, self.encoder.dim, stats_eps)

    # -- latent ---------------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.encoder.num_tokens, self.encoder.dim)

    def add_noise(self, z: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """z + σ·n with σ = τ·U(0,1) (uniform) or |N(0, τ²)| (halfnormal), one σ per sample."""
        shape = (z.shape[0],) + (1,) * (z.ndim - 1)
        if self.noise == "uniform":
            sigma = tau * torch.rand(shape, device=z.device, generator=generator)
        else:
            sigma = (tau * torch.randn(shape, device=z.device, generator=generator)).abs()
        return z + sigma * torch.randn(z.shape, device=z.device, generator=generator)

    @torch.no_grad()
    def update_latent_stats(self, x: torch.Tensor) -> None:
        self.latent_norm.update(self.encoder(x))

    def finish_latent_stats(self) -> None:
        self.latent_norm.finish()

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N, D) for a generator."""
        return self.latent_norm.normalize(self.encoder(x))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.latent_norm.denormalize(z))

    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.pred.weight

    # -- contract -------------------------------------------------------------------------------------
    def forward(self, batch):
        z = self.encoder(batch["x"])
        if self.training and self.noise_tau > 0:
            z = self.add_noise(z, self.noise_tau)
        return {"recon": self.decoder(z), "z": z}

    def encode(self, batch):
        return self.encoder(batch["x"]).mean(1)

    @torch.no_grad()
    def reconstruct(self, batch):
        return self.decoder(self.encoder(batch["x"]))
