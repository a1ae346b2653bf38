"""MAE — Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

Encoder: ViT on the visible patches only (fixed sin-cos positions added before masking, cls token after).
Decoder: linear to the decoder width, learned mask token at every removed position, unshuffle, fixed
sin-cos positions, transformer blocks, linear to p*p*C pixels per patch. The loss lives in
`aeforge.objectives.reconstruction.MaskedPatchMSE`. Parameter names follow the released checkpoints
(see `load_official_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from aeforge.checkpoints import load_checkpoint
from aeforge.models.base import AutoencoderModel
from aeforge.nn.masking import RandomMasking
from aeforge.nn.vit import LayerNorm, PatchEmbed, PatchGrid, blocks, init_weights, sincos_2d


def checked_dims(input_shape, patch_size: int, pool: str | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the data, refused before anything is built when `patch_size` does not tile the image or
    the feature pooling `pool` (cls | mean) is unknown."""
    c, h, w = input_shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"model.patch_size={patch_size} does not divide the data's image size {h}x{w}; "
            f"choose a patch size that divides both (or resize the data)"
        )
    if pool is not None and pool not in ("cls", "mean"):
        raise ValueError(f"model.pool must be 'cls' or 'mean', got {pool!r}")
    return c, h, w


class ViTEncoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + cls token + blocks + final norm.

    Attribute names equal the official MAE/ViT checkpoint keys (patch_embed.proj, cls_token, pos_embed,
    blocks.N.*, norm) so those state dicts load into it unchanged."""

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid, cls_token=True)[None], persistent=True)
        self.blocks = blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = LayerNorm(embed_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All patches, no masking: (B, 1 + L, D) with cls first."""
        return self.run_blocks(self.embed(x))


class MAE(PatchGrid, AutoencoderModel):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        masking: RandomMasking | None = None,
    ):
        super().__init__()
        c, h, w = checked_dims(input_shape, patch_size, pool)
        self.patch_size, self.in_chans, self.pool = patch_size, c, pool
        self.masking = masking or RandomMasking(0.75)
        self.encoder = ViTEncoder((h, w), patch_size, c, embed_dim, depth, num_heads, mlp_ratio)
        self.grid = self.encoder.grid
        num_patches = self.grid[0] * self.grid[1]

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_embed_dim, self.grid, cls_token=True)[None])
        self.decoder_blocks = blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * c)
        self.num_patches = num_patches
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patch conv initialised as a linear layer
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name != "encoder.patch_embed.proj":
                init_weights(m)

    # -- pieces -------------------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor):
        tokens = self.encoder.embed(x)
        b, n, d = tokens.shape
        m = self.masking(b, n, tokens.device)
        visible = torch.gather(tokens, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, d))
        return self.encoder.run_blocks(visible), m

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n_vis, d = x.shape
        mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] + 1 - n_vis, -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    # -- contract -----------------------------------------------------------------------------------
    def forward(self, batch):
        x = batch["x"]
        latent, m = self.forward_encoder(x)
        pred = self.forward_decoder(latent, m.ids_restore)
        return {"pred": pred, "mask": m.mask, "target": self.patchify(x), "latent": latent}

    def encode(self, batch):
        tokens = self.encoder(batch["x"])
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1)

    @torch.no_grad()
    def reconstruct(self, batch, norm_pix: bool = True) -> torch.Tensor:
        """Visible patches pasted from the input, masked ones predicted. With a norm-pixel target the
        prediction is mapped back with the true patch mean/std (as the official visualisation does)."""
        out = self(batch)
        target, pred, mask = out["target"], out["pred"], out["mask"].unsqueeze(-1)
        if norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        return self.unpatchify(target * (1 - mask) + pred * mask)


def load_official_checkpoint(model: MAE, state: Mapping | str, strict: bool = False) -> dict:
    """Load a released MAE checkpoint (`mae_pretrain_vit_base.pth`-style, `{"model": state_dict}` or a
    bare state dict; full encoder+decoder or encoder only) into `model`.

    Returns {"missing": [...], "unexpected": [...]} in aeforge names. Fine-tuning heads (`head.*`,
    `fc_norm.*`) are reported as unexpected and not loaded."""
    if isinstance(state, str):
        state = load_checkpoint(state, what="MAE checkpoint")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    mapped = {}
    for k, v in state.items():
        if k.startswith(("decoder_", "mask_token")):
            mapped[k] = v
        else:
            mapped[f"encoder.{k}"] = v
    own = model.state_dict()
    mismatched = [k for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        shapes = ", ".join(
            f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched
        )
        raise ValueError(f"checkpoint does not fit this MAE configuration: {shapes}")
    result = model.load_state_dict(mapped, strict=strict)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
