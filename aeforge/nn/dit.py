"""Diffusion-transformer blocks for generators in a token latent (RAE's stage 2, FAE's and MAR's generators).

* `DiTBlock`: pre-norm transformer block with AdaLN-Zero conditioning (Peebles & Xie 2023): the condition gives
  a shift, scale and gate for the attention and the MLP branch; the gates start at zero, so a block starts as the
  identity. `lightning=True` is the LightningDiT variant RAE uses: RMSNorm, SwiGLU MLP, RMS-normalised q/k and
  2-D rotary position embedding in attention. The condition may be one vector per sample (B, C) or one per token
  (B, N, C) — the DDT head is conditioned per token.
* `DiT`: tokens (B, N, C_in) + time t in [0, 1] (+ class label) -> (B, N, C_out), patch size 1 (a linear token
  embedding), fixed 2-D sin-cos positions, class dropout for classifier-free guidance (label `num_classes` is the
  null class). With `head_depth > 0` it is DiT^DH (RAE): the backbone's output s, added to the condition and
  passed through SiLU, is projected to the head width and conditions (per token) a shallow, wide head that embeds
  the noisy input x_t afresh and predicts the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.nn.diffusion import timestep_embedding
from aeforge.nn.vit import sincos_2d


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, scale=1000.0))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class, used for dropped labels (p = `dropout` in training)
    and for the unconditional branch of classifier-free guidance."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


def rope_2d(grid: tuple[int, int], head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) of 2-D rotary embedding: the first half of each head rotates with the row, the
    second half with the column (frequencies base^(-2i/d) per half)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim/2)
    ang = torch.cat([ang, ang], dim=1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _per_token(c: torch.Tensor) -> torch.Tensor:
    return c if c.ndim == 3 else c.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, lightning: bool = True,
                 cond_dim: int | None = None):
        super().__init__()
        norm = (lambda: nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)) if lightning else (
            lambda: nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(dim, heads, qk_norm=lightning)
        hidden = int(dim * mlp_ratio)
        # LightningDiT keeps the parameter count of a 4x GELU MLP: SwiGLU hidden = 2/3 of it
        self.mlp = SwiGLU(dim, int(2 * hidden / 3)) if lightning else nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = _per_token(self.ada(c)).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
        self.linear = nn.Linear(dim, out)
        for m in (self.ada[1], self.linear):  # zero output at init (DiT's init)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _per_token(self.ada(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """(x_t (B, N, C), t (B,), y (B,) | None) -> (B, N, C). `grid` (h, w) with h*w = N."""

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        width: int = 1152,
        depth: int = 28,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout: float = 0.1,
        lightning: bool = True,
        head_width: int = 2048,
        head_depth: int = 0,
        head_heads: int = 16,
    ):
        super().__init__()
        self.grid, self.num_classes = tuple(grid), num_classes
        self.x_embed = nn.Linear(channels, width)
        self.register_buffer("pos", sincos_2d(width, self.grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = LabelEmbedder(num_classes, width, class_dropout) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, lightning) for _ in range(depth))
        self.rope = lightning
        self.head_depth = head_depth
        if head_depth > 0:  # DiT^DH: a wide head conditioned per token on the backbone's output
            self.s_proj = nn.Linear(width, head_width)
            self.head_embed = nn.Linear(channels, head_width)
            self.register_buffer("head_pos", sincos_2d(head_width, self.grid)[None], persistent=False)
            self.head = nn.ModuleList(DiTBlock(head_width, head_heads, mlp_ratio, lightning)
                                      for _ in range(head_depth))
            self.final = FinalLayer(head_width, channels)
        else:
            self.final = FinalLayer(width, channels)
        self.apply(self._init)
        for m in self.modules():  # the zero inits of AdaLN and the output, undone by apply() above
            if isinstance(m, (DiTBlock, FinalLayer)):
                nn.init.zeros_(m.ada[1].weight)
                nn.init.zeros_(m.ada[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _rope(self, width: int, heads: int, x: torch.Tensor):
        if not self.rope:
            return None
        cos, sin = rope_2d(self.grid, width // heads)
        return cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.t_embed(t)
        if self.y_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.y_embed(y)
        h = self.x_embed(x) + self.pos
        rope = self._rope(h.shape[-1], self.blocks[0].attn.heads, h) if len(self.blocks) else None
        for blk in self.blocks:
            h = blk(h, c, rope)
        if self.head_depth == 0:
            return self.final(h, c)
        cond = self.s_proj(F.silu(h + c[:, None]))
        z = self.head_embed(x) + self.head_pos
        rope = self._rope(z.shape[-1], self.head[0].attn.heads, z)
        for blk in self.head:
            z = blk(z, cond, rope)
        return self.final(z, cond)
