"""CAE: BEiT block masking, the latent regressor, the alignment target, and the token-target loss (with toy
frozen tokenizers; trained ones are in test_tokenizers.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aeforge.nn.masking import BlockMasking, RandomMasking
from aeforge.objectives.mim import AlignmentMSE, MaskedTokenAccuracy, MaskedTokenCE
from aeforge.objectives.reconstruction import MaskedPatchMSE
from tests.mim_helpers import FixedMasking, check_contract, gen, tiny_cae

# -- BEiT / CAE block masking ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid,kwargs,count", [
    (14, {"ratio": 0.5}, 98),
    (14, {"num_masking_patches": 75}, 75),
    (8, {"ratio": 0.5, "min_num_patches": 4}, 32),
    (8, {"ratio": 0.75, "min_num_patches": 4}, 48),
    (7, {"ratio": 0.4, "min_num_patches": 4}, 20),
])
def test_block_masks_have_the_exact_count(grid, kwargs, count):
    m = BlockMasking(**kwargs)(64, grid * grid, torch.device("cpu"), gen())
    check_contract(m, 64, grid * grid, grid * grid - count)


def test_block_masks_are_blocks_and_seeded():
    def neighbours(mask):  # mean number of masked 4-neighbours of a masked cell
        g = mask.view(-1, 14, 14)
        pad = torch.nn.functional.pad(g, (1, 1, 1, 1))
        n = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
        return float((n * g).sum() / g.sum())

    block = BlockMasking(0.5)(64, 196, torch.device("cpu"), gen(1))
    rand = RandomMasking(0.5)(64, 196, torch.device("cpu"), gen(1))
    assert neighbours(block.mask) > neighbours(rand.mask) + 1.0
    again = BlockMasking(0.5)(64, 196, torch.device("cpu"), gen(1))
    assert torch.equal(block.mask, again.mask)


# -- regressor and alignment target ---------------------------------------------------------------------


def fixed_block_masks(batch: int = 2) -> torch.Tensor:
    return BlockMasking(0.5, min_num_patches=2)(batch, 16, torch.device("cpu"), gen(7)).mask


def test_cae_regressor_sees_only_mask_queries_and_visible_latents():
    mask = fixed_block_masks()
    model = tiny_cae(FixedMasking(mask)).eval()
    x = torch.randn(2, 3, 16, 16)
    pix = model.patchify(x)
    changed_masked = model.unpatchify(pix + 5 * torch.randn_like(pix) * mask[..., None])
    changed_visible = model.unpatchify(pix + 5 * torch.randn_like(pix) * (1 - mask[..., None]))
    with torch.no_grad():
        a, b, c = (model({"x": v}) for v in (x, changed_masked, changed_visible))
    # masked content never reaches the regressor or the decoder, only the alignment target
    assert torch.allclose(a["latent_pred"], b["latent_pred"]) and torch.allclose(a["pred"], b["pred"])
    assert not torch.allclose(a["latent_target"], b["latent_target"])
    assert not torch.allclose(a["latent_pred"], c["latent_pred"])
    # the decoder predicts masked patches only
    assert torch.all(a["pred"][mask == 0] == 0) and a["latent_pred"].shape == (2, 8, 32)


def test_cae_alignment_target_is_the_current_encoder_on_masked_patches_without_gradient():
    mask = fixed_block_masks()
    model = tiny_cae(FixedMasking(mask)).eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = model({"x": x})
    assert out["latent_target"].grad_fn is None and not out["latent_target"].requires_grad
    msk_ids = torch.argsort(mask, dim=1, stable=True)[:, 8:]
    with torch.no_grad():
        expect = model.encoder.run_blocks(model.gather(model.encoder.embed(x), msk_ids))[:, 1:]
    assert torch.allclose(out["latent_target"], expect, atol=1e-6)
    # the alignment loss reaches the pixels only through the visible patches (regressor context)
    AlignmentMSE()(out, {}).backward()
    per_patch = model.patchify(x.grad).abs().sum(-1)
    assert torch.all(per_patch[mask == 1] == 0) and torch.all(per_patch[mask == 0] > 0)
    enc_grads = [p.grad for p in model.encoder.blocks.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in enc_grads)


def test_cae_queries_attend_to_context_and_queries_but_context_is_not_updated():
    model = tiny_cae(FixedMasking(fixed_block_masks()))
    blk = model.regressor[0]
    q, ctx = torch.randn(2, 8, 32), torch.randn(2, 9, 32)
    pos_q, pos_kv = torch.zeros(2, 8, 32), torch.zeros(2, 17, 32)
    ctx_before = ctx.clone()
    out = blk(q, ctx, pos_q, pos_kv)
    assert out.shape == q.shape and torch.equal(ctx, ctx_before)
    assert blk.k.bias is None and blk.q.bias is None and blk.v.bias is None  # q/v biases are separate
    with torch.no_grad():
        blk.gamma_1.fill_(1.0)
    ctx2, q2 = ctx.clone(), q.clone()
    ctx2[:, 3] += torch.randn(32)
    q2[:, 0] += torch.randn(32)
    base = blk(q, ctx, pos_q, pos_kv)
    assert not torch.allclose(base, blk(q, ctx2, pos_q, pos_kv))
    # keys/values are [context; queries] as in the official code: query 0 changes what query 1 reads
    assert not torch.allclose(base[:, 1], blk(q2, ctx, pos_q, pos_kv)[:, 1])


def test_cae_training_step_lowers_the_loss_and_pixel_loss_uses_masked_patches():
    model = tiny_cae(BlockMasking(0.5, min_num_patches=2))
    x = torch.randn(8, 3, 16, 16)
    terms = {"recon": MaskedPatchMSE(), "align": AlignmentMSE(2.0)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model({"x": x})
        loss = sum(t.weight * t(out, {}) for t in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


# -- token target ---------------------------------------------------------------------------------------


class PatchMeanTokenizer(torch.nn.Module):
    """Toy frozen tokenizer: each 4x4 patch's mean intensity quantised into `vocab_size` bins."""

    vocab_size = 8

    def forward(self, x):
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)
        return torch.bucketize(m, torch.linspace(-1.5, 1.5, self.vocab_size - 1))


def test_cae_token_target_variant():
    model = tiny_cae(FixedMasking(fixed_block_masks()), target="tokens", tokenizer=PatchMeanTokenizer())
    out = model({"x": torch.randn(2, 3, 16, 16)})
    assert out["logits"].shape == (2, 8, 8) and out["token_target"].shape == (2, 8)
    assert torch.isfinite(MaskedTokenCE()(out, {})) and 0 <= float(MaskedTokenAccuracy()(out, {})) <= 1
    assert not any(p.requires_grad for p in model.tokenizer.parameters())


class PositionTokenizer(torch.nn.Module):
    """Frozen toy tokenizer: patch i of the 4x4 grid gets code table[i] (vocab 16)."""

    vocab_size = 16

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(16))

    def forward(self, x):
        return self.table.view(1, 4, 4).expand(x.shape[0], -1, -1)


def test_token_loss_is_cross_entropy_over_masked_patches_only():
    mask = BlockMasking(0.5, min_num_patches=2)(2, 16, torch.device("cpu"), torch.Generator().manual_seed(3)).mask
    tok = PositionTokenizer()
    model = tiny_cae(FixedMasking(mask), depth=1, target="tokens", tokenizer=tok)
    x = torch.randn(2, 3, 16, 16)
    out = model({"x": x})
    ids = out["masked_ids"]
    assert torch.equal(out["token_target"], ids)  # code i at patch i: targets are exactly the masked positions
    # the loss on a full-grid view of the logits: zero gradient at every visible position
    full = torch.zeros(2, 16, 16, requires_grad=True)
    logits = out["logits"] + torch.gather(full, 1, ids[..., None].expand(-1, -1, 16))
    loss = MaskedTokenCE()({**out, "logits": logits}, {})
    loss.backward()
    g = full.grad.abs().sum(-1)
    assert torch.all(g[mask == 0] == 0) and torch.all(g[mask == 1] > 0)
    # = the mean CE over the masked cells of the grid, in raster order
    grid_logits = torch.zeros(2, 16, 16).scatter(1, ids[..., None].expand(-1, -1, 16), out["logits"].detach())
    expect = F.cross_entropy(grid_logits[mask == 1], tok.table.expand(2, -1)[mask == 1])
    assert torch.allclose(loss, expect)
    # the visible patches' codes do not matter; a masked patch's code does
    base = float(loss)
    tok.table[int((mask == 0).all(0).nonzero()[0])] = 5  # a patch visible in both images
    assert float(MaskedTokenCE()(model({"x": x}), {})) == pytest.approx(base, abs=1e-6)
    tok.table[int(ids[0, 0])] = (tok.table[int(ids[0, 0])] + 1) % 16
    assert float(MaskedTokenCE()(model({"x": x}), {})) != pytest.approx(base, abs=1e-6)


def test_token_target_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match=r"model.target=tokens needs a tokenizer.*tokenizer=vq"):
        tiny_cae(target="tokens")
    with pytest.raises(ValueError, match=r"a tokenizer is set but model.target=pixel"):
        tiny_cae(tokenizer=PositionTokenizer())
