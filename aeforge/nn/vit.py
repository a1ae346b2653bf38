"""Vision-transformer pieces: patchify, fixed 2-D sin-cos position embeddings, patch embedding, blocks.

The transformer block is timm's `Block` (pre-norm, qkv bias, fused attention), so parameter names match
the released MAE/BEiT-style checkpoints.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed  # noqa: F401  (re-exported for method files)
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), each patch ordered (row-in-patch, col-in-patch, channel)."""
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    b = x.shape[0]
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, gh * p, gw * p)


class PatchGrid:
    """`patchify`/`unpatchify` methods for models that define `patch_size`, `grid` and `in_chans`."""

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid, self.in_chans)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (L[+1], dim): half the channels encode the column, half the row;
    the cls slot (if any) is zeros. Rectangular grids (audio spectrograms) are supported."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width (model.embed_dim / model.decoder_embed_dim) "
                         f"divisible by 4, got {dim}")
    gh, gw = grid
    ww, hh = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> nn.ModuleList:
    rates = [x.item() for x in torch.linspace(0, drop_path, depth)] if depth else []
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=rates[i])
        for i in range(depth)
    )


def init_weights(module: nn.Module) -> None:
    """xavier-uniform Linear weights, zero biases, unit LayerNorm (the MAE/ViT init)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def vit_layer_id(name: str, depth: int, prefix: str = "encoder.") -> int:
    """Layer index of a parameter for layer-wise lr decay (MAE/BEiT): patch embedding, cls token and
    positions 0, block k -> k + 1, everything after the blocks (norms, heads) depth + 1."""
    if name.startswith(tuple(prefix + n for n in ("patch_embed", "cls_token", "pos_embed"))):
        return 0
    if name.startswith(prefix + "blocks."):
        return int(name[len(prefix) + len("blocks."):].split(".")[0]) + 1
    return depth + 1
