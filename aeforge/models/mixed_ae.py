"""MixedAE (Chen et al., CVPR 2023): image mixing + homologous recognition on the MAE core.

No official code exists and the paper's method section could not be read for the method card, so most of
this is the card's reconstruction ([M]) or an aeforge default ([OPEN]); docs/methods/mixed_ae.md lists them.
- Mixing [M]: groups of G = round(1 / visible_ratio) images; a source assignment s in {0..G-1}^L with
  exactly L / G positions per source (argsort of uniform noise, split into G equal chunks); mixed token j
  is token j of image s_j (after patch + position embedding). The encoder sees all L mixed tokens.
- Homologous attention [M]: in `ha_layers` encoder blocks each query keeps only its top-k attention logits
  (k = L / G + 1, cls included) and the rest are set to -inf. Parameter-free; off in `encode` (fine-tuning
  and probes use full attention) [M].
- Unmixing [M]: one decoder pass per source image: its homologous positions carry the encoder features,
  all others the mask token; reconstruct with the MAE norm-pix loss on the heterologous positions
  (outputs pred/target/mask as MAE, so `MaskedPatchMSE` applies unchanged).
- Segment embeddings [S][OPEN]: learned per-source embeddings added to the decoder's homologous tokens
  (`segment_embed`, on by default, flag it in results).
- Homologous contrastive [A names it; form M]: supervised InfoNCE over the last encoder layer's patch
  tokens of each mixed image, positives = same source (aeforge/objectives/mixing.py; lambda, tau [OPEN]).
"""

from __future__ import annotations

import torch
from torch import nn

from aeforge.models.mae import MAE


def mixing_assignment(groups: int, num_tokens: int, sources: int, device, generator=None) -> torch.Tensor:
    """(groups, L) source ids with exactly L / sources positions per source in every group."""
    if num_tokens % sources:
        raise ValueError(f"{num_tokens} tokens cannot be split evenly over {sources} sources")
    noise = torch.rand(groups, num_tokens, device=device, generator=generator)
    rank = noise.argsort(1).argsort(1)  # position -> its rank in a random order
    return rank // (num_tokens // sources)


def mix_tokens(tokens: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """tokens (groups * G, L, D) in group-major order, src (groups, L) -> mixed (groups, L, D) where mixed
    token j comes from image src[g, j] of group g at position j."""
    n, length, d = tokens.shape
    g = src.shape[0]
    per = tokens.view(g, n // g, length, d)
    return torch.gather(per, 1, src[:, None, :, None].expand(-1, 1, -1, d)).squeeze(1)


def topk_attention_mask(q_in: torch.Tensor, block: nn.Module, k: int) -> torch.Tensor:
    """Additive mask (B, heads, N, N): 0 on each query's k largest attention logits of `block`, else -inf."""
    attn = block.attn
    b, n, _ = q_in.shape
    with torch.no_grad():
        qkv = (
            attn.qkv(block.norm1(q_in)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        )
        q, kk = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q * attn.scale) @ kk.transpose(-2, -1)
        idx = logits.topk(min(k, n), dim=-1).indices
        mask = torch.full_like(logits, float("-inf"))
        mask.scatter_(-1, idx, 0.0)
    return mask


class MixedAE(MAE):
    """MAE encoder/decoder + input mixing, homologous (top-k) attention and per-source unmixing.

    outputs: pred, target, mask (1 = heterologous, i.e. reconstructed) in the original batch order; also
    mix_tokens (groups, L, D) last-layer patch tokens, sources (groups, L) and topk_precision (fraction of
    each query's top-k keys that are homologous, in the last HA block)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        visible_ratio: float = 0.25,
        ha_layers: list[int] | None = None,
        segment_embed: bool = True,
        **kwargs,
    ):
        super().__init__(input_shape, **kwargs)
        self.sources = round(1 / visible_ratio)
        if abs(self.sources * visible_ratio - 1) > 1e-6 or self.sources < 2:
            raise ValueError(f"visible_ratio must be 1/G for an integer G >= 2, got {visible_ratio}")
        if self.num_patches % self.sources:
            raise ValueError(f"{self.num_patches} patches cannot be split over {self.sources} mixed images")
        depth = len(self.encoder.blocks)
        self.ha_layers = sorted(range(depth) if ha_layers is None else ha_layers)
        self.k = self.num_patches // self.sources + 1  # homologous patches + cls
        dec_dim = self.mask_token.shape[-1]
        self.segment_embed = nn.Parameter(torch.zeros(1, self.sources, dec_dim)) if segment_embed else None
        if self.segment_embed is not None:
            nn.init.normal_(self.segment_embed, std=0.02)

    def run_mixed_encoder(self, mixed: torch.Tensor):
        enc = self.encoder
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(mixed.shape[0], -1, -1)
        x = torch.cat([cls, mixed], dim=1)
        mask = None
        for i, blk in enumerate(enc.blocks):
            if i in self.ha_layers:
                mask = topk_attention_mask(x, blk, self.k)
                x = blk(x, attn_mask=mask)
            else:
                x = blk(x)
        return enc.norm(x), mask

    def forward(self, batch):
        x = batch["x"]
        b = x.shape[0]
        g_size = self.sources
        pad = (-b) % g_size
        if pad:  # the last (val) batch: fill the final group by repeating images; their outputs are dropped
            x = torch.cat([x, x[torch.arange(pad, device=x.device) % b]], dim=0)
        n = x.shape[0]
        groups = n // g_size
        tokens = self.encoder.embed(x)  # patch embedding + positions
        src = mixing_assignment(groups, tokens.shape[1], g_size, x.device)
        latent, mask = self.run_mixed_encoder(mix_tokens(tokens, src))

        # unmix: one decoder sequence per source image, heterologous positions = mask token
        feats = self.decoder_embed(latent)  # (groups, 1 + L, Dd)
        per_img = feats.repeat_interleave(g_size, dim=0)  # image i = group i // G, source i % G
        src_img = src.repeat_interleave(g_size, dim=0)
        own = torch.arange(n, device=x.device) % g_size
        homologous = src_img == own[:, None]  # (n, L)
        patches = torch.where(homologous[..., None], per_img[:, 1:], self.mask_token.to(per_img.dtype))
        if self.segment_embed is not None:
            patches = patches + homologous[..., None] * self.segment_embed[:, own].transpose(0, 1)
        dec = torch.cat([per_img[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            dec = blk(dec)
        pred = self.decoder_pred(self.decoder_norm(dec))[:, 1:]

        out = {
            "pred": pred[:b],
            "target": self.patchify(x)[:b],
            "mask": (~homologous).float()[:b],
            "latent": latent,
            "mix_tokens": latent[:, 1:],
            "sources": src,
        }
        if mask is not None:
            with torch.no_grad():
                chosen = mask[:, :, 1:, 1:] == 0  # patch queries x patch keys
                same = src[:, None, :, None] == src[:, None, None, :]
                out["topk_precision"] = ((chosen & same).sum() / chosen.sum().clamp_min(1)).detach()
        return out
