"""Bird-MAE: the Kaldi fbank front end, FSDD spectrograms, the spectrogram MAE and the prototypical probe."""

from __future__ import annotations

import math

import pytest
import torch

from aeforge.data.audio import kaldi_fbank, kaldi_mel_banks, mel_scale, pad_or_crop
from aeforge.eval.prototypical import PrototypeHead, PrototypicalProbe, token_map
from aeforge.models.bird_mae import BirdMAE
from aeforge.nn.masking import RandomMasking
from tests.conftest import DATA_DIR, needs_data

# -- front end ------------------------------------------------------------------------------------------


def test_fbank_shape_of_a_five_second_clip_at_32k():
    spec = kaldi_fbank(torch.randn(2, 5 * 32000) * 0.1, 32000, num_mel_bins=128, window="hanning")
    assert spec.shape == (2, 498, 128)  # Bird-MAE: ~498 frames before padding to 512


def test_fbank_energy_sanity():
    sr, t = 16000, torch.arange(16000) / 16000
    tone = 0.1 * torch.sin(2 * math.pi * 1000 * t)
    spec = kaldi_fbank(tone, sr, num_mel_bins=64)[0]
    banks = kaldi_mel_banks(64, 512, sr)
    centre_hz = (banks * torch.arange(257) * sr / 512).sum(1) / banks.sum(1)
    peak = spec.mean(0).argmax().item()
    assert abs(centre_hz[peak].item() - 1000) < 120  # energy lands in the 1 kHz filter
    louder = kaldi_fbank(2 * tone, sr, num_mel_bins=64)[0]
    assert torch.allclose((louder - spec)[:, peak], torch.full((spec.shape[0],), math.log(4.0)), atol=1e-3)
    silence = kaldi_fbank(torch.zeros(16000), sr, num_mel_bins=64)
    assert torch.allclose(silence, torch.full_like(silence, math.log(torch.finfo(torch.float32).eps)))
    # Kaldi mel scale and filter geometry: triangles peak at 1, no negative weights
    assert abs(mel_scale(700.0).item() - 1127 * math.log(2)) < 1e-9
    assert banks.min() >= 0 and banks.max() <= 1 and (banks.sum(1) > 0).all()


def test_pad_value_is_batch_minimum():
    spec = torch.randn(3, 10, 4)
    out = pad_or_crop(spec, torch.tensor([10, 4, 7]), 12)
    assert out.shape == (3, 12, 4)
    valid_min = torch.cat([spec[0], spec[1, :4], spec[2, :7]]).min()
    assert (out[1, 4:] == valid_min).all() and (out[0, 10:] == valid_min).all()
    assert torch.equal(out[2, :7], spec[2, :7])


@needs_data("fsdd", "fsdd.npz")
def test_fsdd_datamodule_gives_spectrograms_with_speakers():
    from aeforge.data.audio import FSDDDataModule

    dm = FSDDDataModule(
        path=str(DATA_DIR / "fsdd" / "fsdd.npz"),
        batch_size=8,
        mean=-6.78,
        std=3.91,
        target_length=64,
        mixup_p=0.5,
    )
    assert len(dm.train_set) == 2700 and len(dm.val_set) == 300 and dm.num_classes == 10
    batch = dm.train_set.__getitems__(list(range(8)))
    assert set(batch) == {"x", "y", "speaker"} and batch["speaker"].max() < 6
    x = dm.normalize(batch["x"])
    assert x.shape == (8, 1, 64, 64) == (8, *dm.input_shape) and torch.isfinite(x).all()
    assert -2 < x.mean() < 2
    torch.manual_seed(0)
    xa = dm.normalize(batch["x"], augment=True)  # roll + gain + mixup change the input, shape kept
    assert xa.shape == x.shape and not torch.allclose(xa, x)


# -- model ----------------------------------------------------------------------------------------------


def test_bird_mae_rectangular_spectrogram_grid():
    model = BirdMAE(
        (1, 96, 64),
        patch_size=16,
        embed_dim=64,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        masking=RandomMasking(0.75),
    )
    assert model.grid == (6, 4)
    out = model({"x": torch.randn(2, 1, 96, 64)})
    assert out["pred"].shape == (2, 24, 256) and out["mask"].sum().item() == 2 * 18
    assert model.tokens({"x": torch.randn(2, 1, 96, 64)}).shape == (2, 25, 64)
    with pytest.raises(ValueError, match="1-channel"):
        BirdMAE((3, 32, 32), patch_size=16)


# -- prototypical probe ---------------------------------------------------------------------------------


def test_prototype_head_structure_and_orthogonality():
    head = PrototypeHead(dim=8, num_classes=3, num_prototypes=4)
    with torch.no_grad():
        head.last_layer.fill_(-1.0)
        head.last_layer[1, 0] = 2.0
    fmap = torch.randn(5, 8, 3, 3, requires_grad=False)
    logits = head(fmap)
    # negative raw weights contribute nothing (ReLU): classes 0 and 2 give exactly the bias
    assert torch.allclose(logits[:, 0], head.bias[0].expand(5)) and torch.allclose(
        logits[:, 2], head.bias[2].expand(5)
    )
    # class c depends only on its own prototypes
    logits[:, 1].sum().backward()
    g = head.prototypes.grad
    assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0 and g[1].abs().sum() > 0
    with torch.no_grad():
        head.prototypes.copy_(torch.eye(8)[:4].expand(3, 4, 8))
    assert head.orthogonality().item() == pytest.approx(0.0, abs=1e-7)


def test_prototypical_probe_on_separable_tokens():
    torch.manual_seed(0)
    d, grid, n = 16, (4, 2), 120
    centres = torch.randn(3, d) * 3

    def make(m):
        y = torch.randint(3, (m,))
        toks = torch.randn(m, 1 + 8, d)
        toks[:, 1 + torch.randint(8, (m,))] += 0  # noise only, class signal below
        toks[torch.arange(m), 1 + torch.randint(8, (m,))] += centres[y]  # one patch carries the class
        return toks, y

    (xtr, ytr), (xva, yva) = make(n), make(60)

    class Ctx:
        model = type("M", (), {"grid": grid})()
        cache = {}

    probe = PrototypicalProbe(
        num_prototypes=3, epochs=40, batch_size=32, prototype_lr=5e-2, last_layer_lr=5e-2, focal=False
    )
    Ctx.cache = {"tokens/train/y": (xtr, ytr), "tokens/val/y": (xva, yva)}
    out = probe(Ctx())
    assert out["acc"] > 0.9 and out["map"] > 0.9
    assert token_map(xtr[:2], grid, focal=True, upsample=2).shape == (2, d, 8, 4)
