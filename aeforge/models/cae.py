"""CAE — Context Autoencoder for Self-Supervised Representation Learning (Chen et al., IJCV 2023).

Pieces (method card mae_family.md §2; [C] = read in the official code):
- Encoder F [C]: ViT with LayerScale on both residual branches, fixed sin-cos positions, cls token; sees
  only the visible patches, in raster order. trunc-normal(0.02) init, BEiT rescale of attn.proj / mlp.fc2.
- Projection [C]: Linear(D -> D_dec) + LayerNorm on the encoder outputs when D_dec != D.
- Latent contextual regressor H [C]: learned mask queries (one token + fixed positions) cross-attend to
  keys [Z_v; Q] + positions and values [Z_v; Q] (no positions on values); q/v biases, no k bias; LayerScale;
  post-norm after the attention residual; the visible latents are never updated. Output LN -> Z_m_hat.
  The masked patches' content never enters H: its only inputs at masked positions are the mask queries.
- Alignment target [C]: the same encoder (shared weights, momentum 0) run under no_grad on the masked
  patches only, cls dropped, same projection -> Z_m_bar; loss MSE(Z_m_hat, sg(Z_m_bar)), weight 2.
- Decoder G [C]: self-attention blocks on Z_m_hat + e_M only (no visible tokens), LN, linear head.
  target="pixel": p*p*C per masked patch with MAE's norm-pix loss — an aeforge variant, not an official
  CAE v1 configuration (the paper's target is DALL-E codes) [card §2.3]. target="tokens": logits over a
  frozen tokenizer's vocabulary (`tokenizer` module mapping images to (B, grid_h, grid_w) codes on the
  patch grid; aeforge trains its own with model=vq_tokenizer, `aeforge.models.vq`), CE on masked patches.
Whether the cls output joins the regressor's keys/values is an implementation reading (it does here: the
encoder output is passed whole, with the zero cls position) [OPEN].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.models.mae import ViTEncoder, checked_dims
from aeforge.nn.masking import BlockMasking
from aeforge.nn.vit import LayerNorm, PatchGrid, sincos_2d


def layerscale_blocks(dim, depth, heads, mlp_ratio, init_values, drop_path=0.0) -> nn.ModuleList:
    rates = [x.item() for x in torch.linspace(0, drop_path, depth)] if depth else []
    return nn.ModuleList(
        Block(
            dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, init_values=init_values, drop_path=r
        )
        for r in rates
    )


class RegressorBlock(nn.Module):
    """CAE regressor layer: queries = masked tokens, keys/values = [visible latents; masked tokens]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, init_values: float, drop_path: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_k, self.norm_v = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, queries, context, pos_q, pos_context):
        kv = torch.cat([context, queries], dim=1)
        q = self.q(self.norm_q(queries + pos_q)) + self.q_bias
        k = self.k(self.norm_k(kv + pos_context))
        v = self.v(self.norm_v(kv)) + self.v_bias
        attn = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        attn = attn.transpose(1, 2).reshape(queries.shape)
        x = queries + self.drop_path(self.gamma_1 * self.proj(attn))
        x = self.norm2(x)
        return x + self.drop_path(self.gamma_2 * self.mlp(x))


class CAE(PatchGrid, AutoencoderModel):
    """outputs: pred (B, L, out) zero at visible positions, target (B, L, p*p*C), mask (B, L), latent_pred
    and latent_target (B, M, D_dec) for the alignment loss, logits/token_target (B, M, ...) when
    target="tokens", latent (B, 1 + K, D) the encoder output."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 768,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_values: float = 0.1,
        drop_path: float = 0.0,
        target: str = "pixel",
        tokenizer: nn.Module | None = None,
        vocab_size: int | None = None,
        pool: str = "cls",
        masking=None,
    ):
        super().__init__()
        c, h, w = checked_dims(input_shape, patch_size, pool)
        if target not in ("pixel", "tokens"):
            raise ValueError(f"model.target must be 'pixel' or 'tokens', got {target!r}")
        if target == "tokens" and tokenizer is None:
            raise ValueError(
                "model.target=tokens needs a tokenizer (images -> (B, grid_h, grid_w) codes): tokenizer=vq "
                "tokenizer.checkpoint=<model=vq_tokenizer run>/checkpoints/last.ckpt, or model.tokenizer._target_=..."
            )
        if target == "pixel" and tokenizer is not None:  # a tokenizer that would be silently ignored
            raise ValueError("a tokenizer is set but model.target=pixel: set model.target=tokens or drop the tokenizer")
        self.patch_size, self.in_chans, self.pool, self.target = patch_size, c, pool, target
        self.masking = masking or BlockMasking(0.5)
        self.encoder = ViTEncoder((h, w), patch_size, c, embed_dim, depth, num_heads, mlp_ratio)
        self.encoder.blocks = layerscale_blocks(
            embed_dim, depth, num_heads, mlp_ratio, init_values, drop_path
        )
        self.grid = self.encoder.grid
        self.num_patches = self.grid[0] * self.grid[1]
        d = decoder_embed_dim
        self.projector = (
            nn.Sequential(nn.Linear(embed_dim, d), LayerNorm(d)) if d != embed_dim else nn.Identity()
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos_embed", sincos_2d(d, self.grid, cls_token=True)[None])
        self.regressor = nn.ModuleList(
            RegressorBlock(d, decoder_num_heads, mlp_ratio, init_values) for _ in range(regressor_depth)
        )
        self.regressor_norm = LayerNorm(d)
        self.decoder_blocks = layerscale_blocks(d, decoder_depth, decoder_num_heads, mlp_ratio, init_values)
        self.decoder_norm = LayerNorm(d)
        if target == "tokens":
            vocab = vocab_size or getattr(tokenizer, "vocab_size", None)
            if not vocab:
                raise ValueError("model.target=tokens needs model.vocab_size (or tokenizer.vocab_size)")
            self.tokenizer = tokenizer.eval().requires_grad_(False)
            self._check_tokenizer_grid(input_shape)
            out = vocab
        else:
            self.tokenizer = None
            out = patch_size * patch_size * c
        self.decoder_pred = nn.Linear(d, out)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("tokenizer"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        for i, blk in enumerate(self.encoder.blocks):  # BEiT's fix_init_weight
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    @torch.no_grad()
    def _check_tokenizer_grid(self, input_shape) -> None:
        """One code per patch, in the patch grid's raster order: fail now, naming both grids, if not."""
        codes = self.tokenizer(torch.zeros(1, *input_shape))
        shape = tuple(codes.shape[1:])
        if shape != tuple(self.grid) and shape != (self.num_patches,):
            raise ValueError(
                f"the tokenizer's code grid {shape} does not match the ViT patch grid {tuple(self.grid)} "
                f"(model.patch_size={self.patch_size} on {input_shape[1]}x{input_shape[2]} images): the tokenizer "
                f"must downsample by the same factor (e.g. model=vq_tokenizer with the same patch_size)"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    # -- pieces -------------------------------------------------------------------------------------
    def split(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, visible ids, masked ids), both id lists in raster order."""
        m = self.masking(batch_size, self.num_patches, device)
        keep = m.ids_keep.shape[1]
        order = torch.argsort(m.mask, dim=1, stable=True)
        return m.mask, order[:, :keep], order[:, keep:]

    @staticmethod
    def gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def encode_subset(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Encoder on the chosen patch tokens (+ cls), projected to the regressor width: (B, 1 + n, D_dec)."""
        return self.projector(self.encoder.run_blocks(self.gather(tokens, ids)))

    def regress(self, context: torch.Tensor, vis_ids: torch.Tensor, msk_ids: torch.Tensor) -> torch.Tensor:
        """Predicted latents of the masked patches from the visible context (B, 1 + K, D_dec)."""
        pos = self.decoder_pos_embed.expand(context.shape[0], -1, -1)
        pos_v = torch.cat([pos[:, :1], self.gather(pos[:, 1:], vis_ids)], dim=1)
        pos_m = self.gather(pos[:, 1:], msk_ids)
        q = self.mask_token.to(context.dtype).expand(msk_ids.shape[0], msk_ids.shape[1], -1)
        pos_kv = torch.cat([pos_v, pos_m], dim=1)
        for blk in self.regressor:
            q = blk(q, context, pos_m, pos_kv)
        return self.regressor_norm(q)

    def decode(self, latents: torch.Tensor, msk_ids: torch.Tensor) -> torch.Tensor:
        x = latents + self.gather(self.decoder_pos_embed[:, 1:].expand(latents.shape[0], -1, -1), msk_ids)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # -- contract -----------------------------------------------------------------------------------
    def forward(self, batch):
        x = batch["x"]
        mask, vis_ids, msk_ids = self.split(x.shape[0], x.device)
        tokens = self.encoder.embed(x)
        latent = self.encoder.run_blocks(self.gather(tokens, vis_ids))
        context = self.projector(latent)
        latent_pred = self.regress(context, vis_ids, msk_ids)
        with torch.no_grad():  # alignment target: the current encoder on the masked patches, no gradient
            latent_target = self.encode_subset(tokens.detach(), msk_ids)[:, 1:]
        out_m = self.decode(latent_pred, msk_ids)
        target = self.patchify(x)
        out = {
            "mask": mask,
            "target": target,
            "latent": latent,
            "latent_pred": latent_pred,
            "latent_target": latent_target.detach(),
            "masked_ids": msk_ids,
        }
        if self.target == "pixel":
            pred = out_m.new_zeros(x.shape[0], self.num_patches, out_m.shape[-1])
            out["pred"] = pred.scatter(1, msk_ids.unsqueeze(-1).expand(-1, -1, out_m.shape[-1]), out_m)
        else:
            with torch.no_grad():
                codes = self.tokenizer(x).reshape(x.shape[0], -1)
            if codes.shape[1] != self.num_patches:
                raise ValueError(
                    f"the tokenizer gives {codes.shape[1]} codes per image, the ViT patch grid {tuple(self.grid)} "
                    f"has {self.num_patches} patches"
                )
            out["logits"] = out_m
            out["token_target"] = torch.gather(codes.long(), 1, msk_ids)
        return out

    def encode(self, batch):
        tokens = self.encoder(batch["x"])
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1)

    @torch.no_grad()
    def reconstruct(self, batch, norm_pix: bool = True) -> torch.Tensor:
        out = self(batch)
        target, mask = out["target"], out["mask"].unsqueeze(-1)
        if self.target != "pixel":
            decode = getattr(self.tokenizer, "decode_codes", None)
            if decode is None:  # a tokenizer without a decoder: nothing to show, masked patches stay black
                return self.unpatchify(target * (1 - mask))
            # the tokenizer's decoding of its own codes with the predicted ones at the masked positions
            x = batch["x"]
            codes = self.tokenizer(x).reshape(x.shape[0], -1).long()
            codes = codes.scatter(1, out["masked_ids"], out["logits"].argmax(-1))
            pred = self.patchify(decode(codes.view(x.shape[0], *self.grid)).to(target.dtype))
            return self.unpatchify(target * (1 - mask) + pred * mask)
        pred = out["pred"]
        if norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        return self.unpatchify(target * (1 - mask) + pred * mask)
