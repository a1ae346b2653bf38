"""MixedAE: image mixing with per-token source ids, homologous top-k attention, unmixing, homologous
contrastive loss."""

from __future__ import annotations

import torch

from aeforge.models.mixed_ae import MixedAE, mix_tokens, mixing_assignment, topk_attention_mask
from aeforge.objectives.mixing import homologous_contrastive
from tests.mim_helpers import TINY_MAE


def _mixed(**kw):
    torch.manual_seed(0)
    return MixedAE((3, 16, 16), patch_size=4, visible_ratio=0.25, **TINY_MAE, **kw)


def test_mixing_keeps_per_token_source_ids():
    src = mixing_assignment(3, 16, 4, "cpu", torch.Generator().manual_seed(0))
    assert all((src[g] == s).sum() == 4 for g in range(3) for s in range(4))  # exactly rL tokens per source
    tokens = torch.randn(12, 16, 5)
    mixed = mix_tokens(tokens, src)
    for g in range(3):
        for j in range(16):
            assert torch.equal(mixed[g, j], tokens[g * 4 + src[g, j], j])
    # unmixing round trip: scattering each source's tokens back recovers them at their positions
    for g in range(3):
        for s in range(4):
            pos = src[g] == s
            assert torch.equal(mixed[g, pos], tokens[g * 4 + s, pos])


def test_mixed_ae_outputs_and_masks():
    model = _mixed()
    x = torch.randn(6, 3, 16, 16)  # not a multiple of 4: the last group is padded, outputs are for 6 images
    out = model({"x": x})
    assert out["pred"].shape == (6, 16, 48) and out["mask"].shape == (6, 16)
    assert (out["mask"].sum(1) == 12).all()  # each image: 1 - r of its patches are heterologous
    src = out["sources"]
    assert src.shape == (2, 16)
    for i in range(6):  # image i's visible (homologous) positions are where its group's source id is i % 4
        assert torch.equal(out["mask"][i] == 0, src[i // 4] == i % 4)
    assert 0 <= out["topk_precision"].item() <= 1


def test_topk_attention_with_k_equal_to_length_is_plain_attention():
    model = _mixed().eval()
    blk = model.encoder.blocks[0]
    x = torch.randn(2, 17, 32)
    mask = topk_attention_mask(x, blk, 17)
    assert (mask == 0).all() and torch.allclose(blk(x, attn_mask=mask), blk(x), atol=1e-6)
    mask = topk_attention_mask(x, blk, 5)
    assert ((mask == 0).sum(-1) == 5).all()


def test_homologous_contrastive_prefers_grouped_tokens():
    torch.manual_seed(0)
    src = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    centres = torch.eye(4)
    grouped = centres[src] + 0.01 * torch.randn(1, 8, 4)
    shuffled = grouped[:, torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])]
    assert homologous_contrastive(grouped, src, 0.2) < homologous_contrastive(shuffled, src, 0.2)
