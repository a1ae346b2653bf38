"""Shared pieces of the masked-image-model tests: tiny MAE sizes, seeded generators, the masks contract, fixed
masks and a tiny CAE."""

from __future__ import annotations

import torch

from aeforge.models.cae import CAE
from aeforge.nn.masking import BlockMasking, Masks, masks_from_binary

# a ViT encoder/decoder small enough for unit tests (MAE and the models built on it)
TINY_MAE = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_contract(m: Masks, batch: int, num_tokens: int, keep: int) -> None:
    assert m.ids_keep.shape == (batch, keep) and m.ids_restore.shape == (batch, num_tokens)
    assert torch.equal((1 - m.mask).sum(1), torch.full((batch,), float(keep)))
    kept = torch.zeros(batch, num_tokens).scatter(1, m.ids_keep, 1.0)
    assert torch.equal(kept, 1 - m.mask)  # ids_keep are exactly the visible positions


class FixedMasking:
    """Always the same masks (to compare forward passes)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, batch, num_tokens, device, generator=None):
        return masks_from_binary(self.mask[:batch].to(device))


def tiny_cae(masking=None, shape=(3, 16, 16), patch_size: int = 4, depth: int = 2, **kwargs) -> CAE:
    """A seeded CAE small enough for unit tests (regressor as deep as the encoder; block masks by default)."""
    torch.manual_seed(0)
    return CAE(shape, patch_size=patch_size, embed_dim=32, depth=depth, num_heads=2, decoder_embed_dim=32,
               regressor_depth=depth, decoder_depth=1, decoder_num_heads=2,
               masking=masking or BlockMasking(0.5, min_num_patches=2), **kwargs)
