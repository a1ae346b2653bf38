"""FAE — "One Layer Is Enough: Adapting Pretrained Visual Encoders for Image Generation" (Gao et al., Apple,
2025); card 6 of /work/shared/methods/vae_video_generative.md.

A frozen pretrained encoder (aeforge/targets/encoders.py: DINOv2-g/14 in the paper) gives patch features
(B, N, D). A single attention layer (merged QKV, `attn_heads` × `attn_head_dim`, skip connection, activation,
linear) maps them to a Gaussian token bottleneck (μ, log σ²) of `latent_dim` channels per token; a transformer
feature decoder (RoPE, RMSNorm, SwiGLU) reconstructs the frozen features from z (stage `feature_vae`: L2 + β·KL,
aeforge/objectives/fae.py). A separate ViT pixel decoder maps features to pixels: stage `pixel_decoder` trains it
on noisy frozen features (x + σ·ε, σ = 0.4 for DINOv2; `pixel_noise_relative` scales σ by the features' RMS for
other encoders), stage `pixel_finetune` on the feature decoder's reconstructions. The stage is the recipe's
top-level `stage` key; only that stage's parts train (the others are frozen and kept as loaded with `ckpt=`).
The frozen encoder's weights are not saved in checkpoints (they come from `encoder_source` again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn.dit import SwiGLU, apply_rope, rope_2d
from aeforge.nn.mlp import activation
from aeforge.nn.vit import LayerNorm, init_weights, unpatchify
from aeforge.targets.encoders import FrozenEncoder

STAGES = ("feature_vae", "pixel_decoder", "pixel_finetune")
ENCODERS = ("attention", "linear")
FROZEN = "frozen_encoder."


class SingleAttentionEncoder(nn.Module):
    """FAE's encoder: h = x + W_o·softmax-attention(x) with one merged QKV projection to heads × head_dim,
    then activation and a linear layer to `out_dim` (= 2 × latent channels: μ and log σ²)."""

    def __init__(self, dim: int, heads: int, head_dim: int, out_dim: int, act: str = "gelu"):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.act = activation(act)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.out(self.act(x + self.proj(h)))


class LinearEncoder(nn.Module):
    """The paper's ablation baseline: one linear map per token."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class RoPEBlock(nn.Module):
    """Pre-norm transformer block: RMSNorm, attention with 2-D RoPE on q and k, RMSNorm, SwiGLU (hidden =
    2/3 · mlp_ratio · dim, the LLaMA sizing that gives the card's 170M for 6 layers at 1536)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2 * mlp_ratio * dim / 3))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        x = x + self.proj(h.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class FeatureDecoder(nn.Module):
    """z (B, N, c) -> features (B, N, D): linear in, RoPE/RMSNorm/SwiGLU blocks, RMSNorm, linear out."""

    def __init__(self, latent_dim: int, out_dim: int, grid: tuple[int, int], width: int, depth: int, heads: int,
                 mlp_ratio: float, rope_base: float):
        super().__init__()
        self.inp = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(RoPEBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.out = nn.Linear(width, out_dim)
        cos, sin = rope_2d(grid, width // heads, rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.inp(z)
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin)
        return self.out(self.norm(x))


class PixelDecoder(nn.Module):
    """Features (B, N, D) on an h×w grid -> images (B, C, H, W): linear to the ViT width, learned positions,
    ViT blocks, LayerNorm, linear to a (H/h)×(W/w)×C patch per token."""

    def __init__(self, in_dim: int, grid: tuple[int, int], image_shape: tuple[int, int, int], width: int,
                 depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        c, h, w = image_shape
        if h % grid[0] or w % grid[1] or h // grid[0] != w // grid[1]:
            raise ValueError(f"the pixel decoder maps a {grid[0]}x{grid[1]} token grid to {h}x{w} images: the image "
                             f"size must be a multiple of the grid (same factor on both sides)")
        self.patch, self.grid, self.channels = h // grid[0], grid, c
        self.inp = nn.Linear(in_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(depth))
        self.norm = LayerNorm(width)
        self.out = nn.Linear(width, self.patch * self.patch * c)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.inp(feats) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return unpatchify(self.out(self.norm(x)), self.patch, self.grid, self.channels)


class FAE(AutoencoderModel):
    """input_shape (C, H, W) in the data's normalisation (`encoder_data_mean`/`std` tell the frozen encoder
    what it is). `stage`: feature_vae | pixel_decoder | pixel_finetune (the recipe's top-level key)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        stage: str = "feature_vae",
        encoder_source: str = "hf:facebook/dinov2-with-registers-base",
        encoder_input_size: int | None = None,
        encoder_missing_weights: str = "error",
        encoder_kwargs: dict | None = None,
        encoder_data_mean: list[float] | None = None,
        encoder_data_std: list[float] | None = None,
        encoder_type: str = "attention",
        attn_heads: int = 24,
        attn_head_dim: int = 256,
        attn_activation: str = "gelu",
        latent_dim: int = 32,
        decoder_dim: int = 1536,
        decoder_depth: int = 6,
        decoder_heads: int = 24,
        decoder_mlp_ratio: float = 4.0,
        rope_base: float = 10000.0,
        pixel_dim: int = 1024,
        pixel_depth: int = 24,
        pixel_heads: int = 16,
        pixel_mlp_ratio: float = 4.0,
        pixel_noise_std: float = 0.4,
        pixel_noise_relative: bool = False,
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}: valid choices {list(STAGES)} (the recipe's top-level `stage`)")
        if encoder_type not in ENCODERS:
            raise ValueError(f"model.encoder_type={encoder_type!r}: valid choices {list(ENCODERS)}")
        if len(input_shape) != 3:
            raise ValueError(f"FAE needs (C, H, W) images, got input_shape={tuple(input_shape)}")
        self.stage, self.input_shape = stage, tuple(input_shape)
        self.pixel_noise_std, self.pixel_noise_relative = pixel_noise_std, pixel_noise_relative
        self.frozen_encoder = FrozenEncoder(
            encoder_source, input_size=encoder_input_size, missing_weights=encoder_missing_weights,
            model_kwargs=encoder_kwargs, data_mean=encoder_data_mean, data_std=encoder_data_std)
        dim, grid = self.frozen_encoder.dim, self.frozen_encoder.grid
        self.feature_dim, self.grid, self.latent_dim = dim, grid, latent_dim
        self.encoder = (SingleAttentionEncoder(dim, attn_heads, attn_head_dim, 2 * latent_dim, attn_activation)
                        if encoder_type == "attention" else LinearEncoder(dim, 2 * latent_dim))
        self.feature_decoder = FeatureDecoder(latent_dim, dim, grid, decoder_dim, decoder_depth, decoder_heads,
                                              decoder_mlp_ratio, rope_base)
        self.pixel_decoder = PixelDecoder(dim, grid, self.input_shape, pixel_dim, pixel_depth, pixel_heads,
                                          pixel_mlp_ratio)
        for m in (self.encoder, self.feature_decoder):
            m.apply(init_weights)
        trains = {"feature_vae": (self.encoder, self.feature_decoder)}.get(stage, (self.pixel_decoder,))
        for part in (self.encoder, self.feature_decoder, self.pixel_decoder):
            part.requires_grad_(part in trains)
        # the frozen encoder's weights come from its source, never from our checkpoints (DINOv2-g is 4.4 GB)
        self._register_state_dict_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen)

    # -- pieces -----------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen_encoder(x)

    def posterior(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(feats).float().chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def noisy(self, feats: torch.Tensor) -> torch.Tensor:
        """Stage Ib's input: x + σ·ε (σ relative to the features' RMS when pixel_noise_relative)."""
        std = self.pixel_noise_std
        if self.pixel_noise_relative:
            std = std * feats.pow(2).mean(-1, keepdim=True).sqrt()
        return feats + std * torch.randn_like(feats)

    # -- contract ---------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        x = batch["x"]
        feats = self.features(x)
        if self.stage == "feature_vae":
            mu, logvar = self.posterior(feats)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
            return {"feat": feats, "feat_pred": self.feature_decoder(z), "mu": mu, "logvar": logvar, "z": z}
        if self.stage == "pixel_decoder":
            src = self.noisy(feats) if self.training else feats
        else:
            with torch.no_grad():
                src = self.feature_decoder(self.posterior(feats)[0])
        return {"recon": self.pixel_decoder(src), "feat": feats}

    def encode(self, batch: dict) -> torch.Tensor:
        """Mean-pooled μ of the token latents (B, latent_dim)."""
        return self.posterior(self.features(batch["x"]))[0].mean(1)

    def latents(self, batch: dict) -> torch.Tensor:
        """The generator's input: μ on the token grid, (B, N, latent_dim)."""
        return self.posterior(self.features(batch["x"]))[0]

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> torch.Tensor:
        """Image -> features -> z (μ) -> features -> pixels (the pixel decoder is untrained in feature_vae)."""
        return self.pixel_decoder(self.feature_decoder(self.latents(batch)))


def _drop_frozen(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + FROZEN)]:
        del state_dict[key]


def _ignore_missing_frozen(module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if FROZEN not in k]
