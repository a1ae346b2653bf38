"""MAE mechanics: masking, patchify, loss on masked patches only, position embeddings, official checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.models.mae import MAE, load_official_checkpoint
from aeforge.nn.masking import RandomMasking
from aeforge.nn.vit import patchify, sincos_2d, unpatchify
from aeforge.objectives.reconstruction import MaskedPatchMSE, normalize_patches
from tests.mim_helpers import TINY_MAE

TINY = dict(patch_size=4, **TINY_MAE)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_masked_fraction_equals_ratio(ratio):
    L, B = 64, 8
    m = RandomMasking(ratio)(B, L, torch.device("cpu"), torch.Generator().manual_seed(0))
    keep = int(L * (1 - ratio))
    assert m.ids_keep.shape == (B, keep)
    assert torch.all(m.mask.sum(1) == L - keep)
    assert m.mask.sum() == B * (L - keep)
    # ids_restore inverts the shuffle and the kept ids are exactly the visible positions
    visible = torch.zeros(B, L).scatter_(1, m.ids_keep, 1.0)
    assert torch.equal(visible, 1 - m.mask)
    shuffled = torch.argsort(torch.argsort(torch.rand(B, L), 1), 1)
    assert shuffled.shape == m.ids_restore.shape


def test_unpatchify_patchify_identity():
    x = torch.randn(3, 3, 32, 24)
    p = patchify(x, 8)
    assert p.shape == (3, 12, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (4, 3), 3), x)
    # patch vectors are ordered (row-in-patch, col-in-patch, channel)
    assert torch.equal(p[0, 0, :3], x[0, :, 0, 0])
    assert torch.equal(p[0, 0, 3:6], x[0, :, 0, 1])


def test_sincos_position_embedding():
    emb = sincos_2d(16, (3, 5), cls_token=True)
    assert emb.shape == (16, 16)
    assert torch.all(emb[0] == 0)
    # first half encodes the column index, second half the row index
    grid = emb[1:].view(3, 5, 16)
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8]) and torch.allclose(grid[:, 0, 8:], grid[:, 4, 8:])
    assert torch.allclose(grid[0, 1, :4], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(4) / 4.0)))


def test_loss_only_on_masked_patches():
    torch.manual_seed(0)
    model = MAE((3, 16, 16), **TINY)
    out = model({"x": torch.randn(4, 3, 16, 16)})
    pred = out["pred"].detach().requires_grad_(True)
    loss = MaskedPatchMSE(norm_pix=True)({**out, "pred": pred}, {})
    loss.backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert torch.all(grad_per_patch[out["mask"] == 0] == 0)
    assert torch.all(grad_per_patch[out["mask"] == 1] > 0)
    # normalisation over all masked patches of the batch, with unbiased per-patch variance
    target = normalize_patches(out["target"])
    expected = ((out["pred"] - target) ** 2).mean(-1)[out["mask"] == 1].mean()
    assert torch.allclose(loss, expected)
    t = out["target"][0, 0]
    assert torch.allclose(target[0, 0], (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt())


def test_patch_size_must_divide_image():
    with pytest.raises(ValueError, match="patch_size=5 does not divide"):
        MAE((1, 28, 28), **{**TINY, "patch_size": 5})


def official_layout(depth: int, dec_depth: int, D: int, Dd: int, p: int, c: int, L: int, mlp: int = 4) -> dict:
    """Parameter names and shapes of facebookresearch/mae's MaskedAutoencoderViT state dict."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "patch_embed.proj.weight": (D, c, p, p),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,), "mask_token": (1, 1, Dd),
              "decoder_pos_embed": (1, L + 1, Dd), "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
              "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,), "decoder_pred.weight": (p * p * c, Dd),
              "decoder_pred.bias": (p * p * c,)}
    for prefix, n, d in (("blocks", depth, D), ("decoder_blocks", dec_depth, Dd)):
        for i in range(n):
            b = f"{prefix}.{i}."
            block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
                     "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                     "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (mlp * d, d),
                     "mlp.fc1.bias": (mlp * d,), "mlp.fc2.weight": (d, mlp * d), "mlp.fc2.bias": (d,)}
            shapes.update({b + k: s for k, s in block.items()})
    return shapes


@pytest.mark.parametrize("encoder_only", [False, True])
def test_official_checkpoint_loads(tmp_path, encoder_only):
    layout = official_layout(depth=2, dec_depth=1, D=32, Dd=16, p=4, c=3, L=16)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) for k, s in layout.items()}
    if encoder_only:  # mae_pretrain_vit_base.pth holds the encoder (+ fine-tune heads if any)
        state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
        state["fc_norm.weight"] = torch.ones(32)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": state}, path)

    model = MAE((3, 16, 16), **TINY)
    report = load_official_checkpoint(model, str(path))
    own = model.state_dict()
    for k, v in state.items():
        if k == "fc_norm.weight":
            continue
        ours = k if k.startswith(("decoder", "mask_token")) else f"encoder.{k}"
        assert torch.equal(own[ours], v), k
    if encoder_only:
        assert "encoder.fc_norm.weight" in report["unexpected"]
        assert any(k.startswith("decoder_blocks") for k in report["missing"])
    else:
        assert report["missing"] == [] and report["unexpected"] == []
    # a ViT-B checkpoint does not fit a tiny model: the error names the parameter
    bad = {"model": {"cls_token": torch.zeros(1, 1, 768)}}
    with pytest.raises(ValueError, match="cls_token"):
        load_official_checkpoint(model, bad)


def test_mae_loss_falls_on_mnist():
    """The MAE mechanism learns: norm-pixel loss on real digits falls well below its start within 60 steps."""
    from aeforge.cli import ASSETS
    from aeforge.data.images import ArrayImageDataModule

    torch.manual_seed(0)
    dm = ArrayImageDataModule(path=str(ASSETS / "mnist_subset.npz"), batch_size=64, num_workers=0,
                              mean=[0.1307], std=[0.3081])
    model = MAE((1, 28, 28), **{**TINY, "embed_dim": 64, "num_heads": 4, "decoder_embed_dim": 32})
    loss_fn = MaskedPatchMSE(norm_pix=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    x_all = dm.train_set.x[:3840]
    for step in range(60):
        x = dm.normalize(x_all[step * 64 : (step + 1) * 64])
        loss = loss_fn(model({"x": x}), {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5])


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_ids_restore_inverts_the_shuffle(ratio):
    """ids_shuffle = argsort(noise) with the generator's noise; ids_restore is its inverse permutation, the kept
    ids are its head, and unshuffling [kept tokens; masked tokens] (what the decoder does) restores the order."""
    B, L = 6, 16
    m = RandomMasking(ratio)(B, L, torch.device("cpu"), torch.Generator().manual_seed(3))
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(3))  # the same draw
    ids_shuffle = torch.argsort(noise, dim=1)
    arange = torch.arange(L).expand(B, L)
    assert torch.equal(torch.gather(ids_shuffle, 1, m.ids_restore), arange)
    assert torch.equal(torch.gather(m.ids_restore, 1, ids_shuffle), arange)
    keep = m.ids_keep.shape[1]
    assert torch.equal(m.ids_keep, ids_shuffle[:, :keep])
    tokens = torch.randn(B, L, 3)
    kept = torch.gather(tokens, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, 3))
    masked = torch.gather(tokens, 1, ids_shuffle[:, keep:].unsqueeze(-1).expand(-1, -1, 3))
    unshuffled = torch.gather(torch.cat([kept, masked], 1), 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(unshuffled, tokens)
    # the mask is 1 exactly where the decoder places mask tokens (shuffled positions >= keep)
    assert torch.equal(m.mask, (m.ids_restore >= keep).float())
