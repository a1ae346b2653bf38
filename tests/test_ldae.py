"""LDAE (card 7) and its volume data: the synthetic generator and the folder source (NIfTI / npz + labels CSV,
a missing or corrupt file named in one error), the shift branch starting as the identity correction, DDIM
encode → decode returning the latent at η = 0, frozen parts bit-identical after training while the encoder and
shift branch learn, stage chaining through ckpt=, the 2.5-D LPIPS term and bad input.
Proof on synthetic volumes: scripts/proof_ldae.py (docs/methods/ldae.md)."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from aeforge.data.sources import DataFileError
from aeforge.data.volumes import VolumeDataModule, synthetic_volumes
from aeforge.models.ldae import LDAE
from aeforge.modules.base import AEModule
from aeforge.modules.optim import OptimSettings
from aeforge.objectives import Objective
from aeforge.objectives.flow import EpsilonLoss

TINY = dict(ae_channels=[8, 8], ae_res_blocks=1, latent_channels=2, ae_groups=4, unet_channels=8, unet_mult=[1, 2],
            unet_res_blocks=1, unet_attention=[2], unet_dropout=0.0, unet_groups=4, timesteps=50,
            encoder_backbone="cnn", encoder_channels=[4, 8], semantic_dim=8, ddim_steps=10)
SHAPE = (1, 8, 16, 16)


def _model(stage: str, seed: int = 0, **kw) -> LDAE:
    torch.manual_seed(seed)
    return LDAE(list(SHAPE), stage=stage, **{**TINY, **kw})


def _dm(**kw) -> VolumeDataModule:
    args = dict(source="synthetic", volume_shape=list(SHAPE[1:]), num_volumes=24, batch_size=4,
                mean=[0.5], std=[0.5], val_fraction=0.2, test_fraction=0.2)
    return VolumeDataModule(**{**args, **kw})


# -- data ---------------------------------------------------------------------------------------------
def test_synthetic_volumes_are_deterministic_and_carry_label_and_age():
    x, y, age = synthetic_volumes(64, (16, 16, 16), seed=3)
    x2, y2, age2 = synthetic_volumes(64, (16, 16, 16), seed=3)
    assert x.dtype == np.uint8 and x.shape == (64, 1, 16, 16, 16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(age, age2)
    assert set(np.unique(y)) == {0, 1} and 55 <= age.min() and age.max() <= 90
    # the ventricles (dark voxels inside the brain) grow with the label and with age
    brain = (x[:, 0] > 0).sum((1, 2, 3))
    vent = ((x[:, 0] > 0) & (x[:, 0] < 70)).sum((1, 2, 3)) / brain
    assert np.corrcoef(vent, y)[0, 1] > 0.3 and np.corrcoef(vent, age)[0, 1] > 0.2


def test_datamodule_batches_uint8_on_the_wire_normalised_on_device():
    dm = _dm()
    assert dm.modality == "volume" and dm.input_shape == SHAPE and dm.num_classes == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape == (4, *SHAPE)
    assert batch["y"].dtype == torch.long and batch["factor"].dtype == torch.float32
    x = dm.on_after_batch_transfer(dict(batch))["x"]
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.allclose(dm.denormalize(x), batch["x"].float() / 255)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 24


def _write_folder(tmp_path, n: int = 10):
    import nibabel as nib

    x, _, age = synthetic_volumes(n, (6, 8, 10), seed=0)
    rows = ["file,label,age"]
    for i in range(n):
        name = f"v{i}.nii.gz" if i % 2 else f"v{i}.npz"
        vol = x[i, 0].astype(np.float32) * 3 + 100  # another intensity range: min-max scaled on read
        if name.endswith(".npz"):
            np.savez(tmp_path / name, x=vol)
        else:
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / name))
        rows.append(f"{name},{'AD' if i % 3 == 0 else 'CN'},{age[i] if i != 4 else ''}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return x


@pytest.mark.parametrize("preload", [True, False])
def test_folder_of_nifti_and_npz_with_labels_csv(tmp_path, preload):
    x = _write_folder(tmp_path)
    dm = VolumeDataModule(source="folder", path=str(tmp_path), volume_shape=[6, 8, 10], preload=preload,
                          val_fraction=0.2, test_fraction=0.2, batch_size=10)
    assert dm.class_names == ["AD", "CN"] and dm.num_classes == 2 and dm.input_shape == (1, 6, 8, 10)
    got = {}
    for split in ("train", "val", "test"):
        for b in dm.eval_dataloader(split, 10):
            for xi, fi in zip(b["x"], b["factor"]):
                got[float(fi)] = xi
    assert len(got) == 10 and any(np.isnan(k) for k in got)  # row 4 has no age: NaN, not an error
    # min-max scaling undoes the file's intensity range: the synthetic volume comes back, stretched to [0, 255]
    _, _, age = synthetic_volumes(10, (6, 8, 10), seed=0)
    want = torch.from_numpy(np.round(x[1] / x[1].max() * 255)).int()
    assert (got[float(np.float32(age[1]))].int() - want).abs().max() <= 1
    # another shape: resized on read
    dm2 = VolumeDataModule(source="folder", path=str(tmp_path), volume_shape=[4, 4, 4], preload=preload,
                           val_fraction=0.2, test_fraction=0.2)
    assert next(iter(dm2.eval_dataloader("train", 2)))["x"].shape == (2, 1, 4, 4, 4)


def test_missing_and_corrupt_volume_files_are_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "v2.npz").unlink()
    with pytest.raises(DataFileError, match=r"volume file not found: .*v2\.npz .*line 4"):
        VolumeDataModule(source="folder", path=str(tmp_path), volume_shape=[6, 8, 10])
    (tmp_path / "v2.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFileError, match=r"v2\.npz is corrupt"):
        VolumeDataModule(source="folder", path=str(tmp_path), volume_shape=[6, 8, 10], preload=True)
    (tmp_path / "v2.npz").unlink()
    (tmp_path / "v3.nii.gz").write_bytes(b"\x1f\x8b garbage")
    np.savez(tmp_path / "v2.npz", x=np.zeros((6, 8, 10), np.float32))
    dm = VolumeDataModule(source="folder", path=str(tmp_path), volume_shape=[6, 8, 10], preload=False,
                          val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataFileError, match=r"v3\.nii\.gz is corrupt or unreadable"):  # lazily: at its read
        for split in ("train", "val", "test"):
            for _ in dm.eval_dataloader(split, 10):
                pass
    with pytest.raises(DataFileError, match="labels CSV not found"):
        VolumeDataModule(source="folder", path=str(tmp_path), labels_csv=str(tmp_path / "nope.csv"))
    with pytest.raises(DataFileError, match=r"data.source='nifti' .*\['folder', 'synthetic'\]"):
        VolumeDataModule(source="nifti")


# -- the model's mechanisms -----------------------------------------------------------------------------
def test_shift_branch_starts_as_the_identity_correction():
    model = _model("semantic").train()
    batch = {"x": torch.randn(3, *SHAPE)}
    torch.manual_seed(1)
    out = model(batch)
    assert torch.count_nonzero(out["shift"]) == 0
    # the shifted prediction is the frozen DDPM's own at the same (z_t, t)
    torch.manual_seed(1)
    z0 = model.latents(batch["x"])
    t = model.schedule.sample_timesteps(3)
    eps = torch.randn_like(z0)
    frozen = model.unet(model.schedule.q_sample(z0, t, eps), t)
    assert torch.equal(out["eps_pred"], frozen) and torch.equal(out["eps"], eps)
    # c_t and w_t against the card's formulas
    abar = model.schedule.alphas_cumprod.double()
    tt = torch.tensor([0, 7, 49])
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])[tt]
    c = -(abar[tt] / prev).sqrt() * (1 - prev) / (1 - abar[tt]).sqrt()
    got = model.shift_coefficient(tt, torch.zeros(3, 1)).view(-1)
    assert torch.allclose(got.double(), c, atol=1e-6) and got[0] == 0


def _perturb(model: LDAE, seed: int = 0) -> None:
    """Non-zero output convs (zero at init), so that ε and G depend on their inputs."""
    g = torch.Generator().manual_seed(seed)
    for conv in (model.unet.out[-1], model.shift.out[-1]):
        with torch.no_grad():
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g))


def test_ddim_encode_then_decode_returns_the_latent():
    """With LDAE's shifted ε (ε_θ + c_t·G(·, y)); the plain DDPM's inversion is tested in test_gen_blocks.py."""
    model = _model("semantic").eval()
    _perturb(model)
    x = torch.randn(2, *SHAPE)
    y = model.encoder(x)
    z0 = model.latents(x)
    errors = []
    with torch.no_grad():
        for steps in (4, 40):
            z_t = model.schedule.ddim_encode(model.eps_fn(y), z0, steps)
            back = model.schedule.ddim_sample(model.eps_fn(y), z_t, steps)
            errors.append(((back - z0).norm() / z0.norm()).item())
    # within 1 % at 40 steps (measured 0.4 % at 50), and better with the finer grid
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 3
    assert (z_t - z0).norm() > 0.2 * z0.norm()  # it did travel towards noise (ᾱ_49 ≈ 0.6 at T = 50) and back


def test_frozen_parts_stay_bit_identical_while_encoder_and_shift_learn(tmp_path):
    model = _model("semantic")
    _perturb(model)
    frozen = {k: v.clone() for k, v in {**model.aekl.state_dict(), **model.unet.state_dict()}.items()}
    learned = {k: v.clone() for k, v in model.named_parameters() if k.startswith(("encoder.", "shift.", "condition."))}
    assert all(not p.requires_grad for p in [*model.aekl.parameters(), *model.unet.parameters()])
    module = AEModule(model=model, objective=Objective({"eps": EpsilonLoss(key_weight="weight")}),
                      optim=OptimSettings(optimizer="adam", lr=1e-2, schedule="constant"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_dm())
    after = {**model.aekl.state_dict(), **model.unet.state_dict()}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not model.unet.training and not model.aekl.training  # dropout/norms of the frozen DDPM stay off
    changed = [k for k, p in model.named_parameters() if k in learned and not torch.equal(p, learned[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("shift.") for k in changed)
    assert float(model.latent_scale) > 0  # measured on the first training batch


def test_stages_chain_through_ckpt(tmp_path):
    from aeforge.train import init_from_checkpoint

    stage1 = _model("aekl", seed=1)
    torch.save({"state_dict": {f"model.{k}": v for k, v in stage1.state_dict().items()}}, tmp_path / "s1.ckpt")
    stage2 = _model("ddpm", seed=2)
    counts = init_from_checkpoint(stage2, str(tmp_path / "s1.ckpt"))
    assert counts["ckpt/unused"] == 0 and counts["ckpt/new"] > 0  # the UNet is new at stage 2
    assert all(torch.equal(a, b) for a, b in zip(stage1.aekl.state_dict().values(), stage2.aekl.state_dict().values()))
    assert not any(p.requires_grad for p in stage2.aekl.parameters())
    out = stage2({"x": torch.randn(2, *SHAPE)})
    assert out["eps_pred"].shape == out["eps"].shape == (2, 2, 4, 8, 8)


def test_stage_outputs_encode_and_reconstruct():
    x = torch.randn(2, *SHAPE)
    aekl = _model("aekl").train()
    out = aekl({"x": x})
    assert out["recon"].shape == x.shape and out["mu"].shape == out["logvar"].shape == (2, 2 * 4 * 8 * 8)
    assert aekl.last_layer_weight() is aekl.aekl.decoder.blocks[-1].conv.weight
    sem = _model("semantic").eval()
    assert sem.encode({"x": x}).shape == (2, 8)
    assert sem.reconstruct({"x": x}).shape == x.shape
    assert sem.reconstruct_from_semantic({"x": x}, steps=3).shape == x.shape


def test_bad_model_arguments_name_the_key():
    with pytest.raises(ValueError, match=r"model.stage='pdae'; valid: \['aekl', 'ddpm', 'semantic'\]"):
        _model("pdae")
    with pytest.raises(ValueError, match="divisible by 2"):
        LDAE([1, 7, 16, 16], **TINY)
    with pytest.raises(ValueError, match=r"model.encoder_backbone='resnet'; valid"):
        _model("semantic", encoder_backbone="resnet")
    with pytest.raises(ValueError, match="ddim_reconstruct needs the latent DDPM"):
        _model("aekl").ddim_reconstruct({"x": torch.randn(1, *SHAPE)})


def test_slice_lpips_scores_three_planes():
    from aeforge.objectives.ldae import SliceLPIPS

    term = SliceLPIPS(net="squeeze", fake_3d_ratio=0.5)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    assert term({"recon": x}, {"x": x}).item() == pytest.approx(0.0, abs=1e-6)
    assert term({"recon": x.flip(-1)}, {"x": x}).item() > 0
    with pytest.raises(ValueError, match="fake_3d_ratio"):
        SliceLPIPS(fake_3d_ratio=0.0)
