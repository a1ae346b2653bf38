"""Masking generators for masked image modelling.

Contract (shared by every generator): given a batch size, the number of tokens L and a device, return
`ids_keep` (B, K), `ids_restore` (B, L) and `mask` (B, L) with 1 = removed, 0 = visible. K is the same
for every sample so visible tokens stack into one tensor. The optional generator makes them seedable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Masks:
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


class RandomMasking:
    """MAE's per-sample random masking: argsort uniform noise, keep the K = floor(L (1 - ratio)) smallest."""

    def __init__(self, ratio: float = 0.75):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def num_keep(self, num_tokens: int) -> int:
        return int(num_tokens * (1 - self.ratio))

    def __call__(
        self, batch: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Masks:
        keep = self.num_keep(num_tokens)
        noise = torch.rand(batch, num_tokens, device=device, generator=generator)
        return masks_from_noise(noise, keep)


def masks_from_noise(noise: torch.Tensor, keep: int) -> Masks:
    """Keep the `keep` positions with the smallest noise; shared by every noise-ranking generator."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masks(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)
