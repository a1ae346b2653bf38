"""ColorMAE: filtered-noise masks (exact ratio, colour spectra, white = MAE random masking) in the MAE core."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.models.mae import MAE
from aeforge.nn.masking import ColorNoiseMasking, RandomMasking, color_noise_bank, radial_power
from aeforge.objectives.reconstruction import MaskedPatchMSE
from tests.mim_helpers import check_contract, gen


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
