"""PHG-MAE: whole-modality masking, K-mask ensembles, distillation, and pseudo-label rounds on the video
modalities data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aeforge.callbacks.pseudo_labels import PseudoLabelRounds
from aeforge.data.video_modalities import VideoModalitiesDataModule, layout
from aeforge.models.phg_mae import PHGMAE, PHGDistill, apply_modality_mask
from aeforge.objectives.multimodal import NO_LABEL, DistillLoss, ModalityLoss

# -- model, masking, losses -----------------------------------------------------------------------------


def _phg():
    torch.manual_seed(0)
    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    return PHGMAE((3 + 1 + 2 + 1 + 4, 16, 16), mods, num_semantic=4, width=4, keep_prob=0.5)


def test_layout_round_trip_and_whole_modalities_masked():
    blocks = layout(["rgb", "edges", "hsv", "blur", "semantic"], 4)
    assert [(s.start, s.stop) for s in blocks.values()] == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 11)]
    x = torch.randn(64, 11, 5, 5) + 3  # no exact zeros in the data
    model = _phg()
    keep = model.masking(64, x.device)
    assert keep[:, 0].all()  # RGB always kept
    assert 0 < keep[:, 1:].float().mean() < 1  # others sometimes dropped
    masked = apply_modality_mask(x, keep, blocks)
    for i, s in enumerate(blocks.values()):
        block = masked[:, s]
        dropped = ~keep[:, i]
        assert (block[dropped] == 0).all()  # every channel of a dropped modality is exactly zero
        assert torch.equal(block[~dropped], x[:, s][~dropped])  # kept ones untouched
    # unlabelled frames never get their target map as input
    out = model({"x": x[:, :, :4, :4].repeat(1, 1, 4, 4), "labeled": torch.zeros(64, dtype=torch.bool)})
    assert not out["keep"][:, 4].any() and out["pred"].shape == (64, 11, 16, 16)


def test_ensemble_k1_all_kept_equals_single_forward():
    model = _phg().eval()
    x = torch.randn(3, 11, 16, 16)
    probs = model.predict_semantic({"x": x}, k=1, mode="all")
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[:, 4] = False  # the target is never an input at test time
    single = model.net(torch.cat([x[:, :7], torch.zeros(3, 4, 16, 16)], 1))[:, 7:].softmax(1)
    assert torch.allclose(probs, single, atol=1e-6)
    assert torch.equal(model.test_mask(3, "cpu", mode="all"), keep)
    ens = model.predict_semantic({"x": x}, k=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ens.sum(1), torch.ones(3, 16, 16), atol=1e-5)


def test_modality_losses_only_count_labelled_semantics():
    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    ce = ModalityLoss("semantic", mods, num_semantic=4, kind="ce")
    pred = torch.randn(2, 11, 4, 4)
    sem = torch.randint(4, (2, 4, 4))
    both = ce(
        {"pred": pred, "keep": torch.ones(2, 5, dtype=torch.bool)},
        {"sem": sem, "labeled": torch.tensor([1, 1])},
    )
    first = ce(
        {"pred": pred, "keep": torch.ones(2, 5, dtype=torch.bool)},
        {"sem": sem, "labeled": torch.tensor([1, 0])},
    )
    ref = torch.nn.functional.cross_entropy(pred[:1, 7:], sem[:1])
    assert torch.allclose(first, ref) and not torch.allclose(both, first)
    l1 = ModalityLoss("edges", mods, num_semantic=4, kind="l1", only_masked=True)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 1] = False
    x = torch.randn(2, 11, 4, 4)
    got = l1({"pred": pred, "keep": keep}, {"x": x})
    assert torch.allclose(got, (pred[1, 3] - x[1, 3]).abs().mean())


# -- distillation ---------------------------------------------------------------------------------------


def _teacher_ckpt(tmp_path, model) -> str:
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


def _student(path, **kw):
    torch.manual_seed(1)
    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    return PHGDistill((11, 16, 16), mods, num_semantic=4, width=2, teacher_checkpoint=path, teacher_k=2, **kw)


def test_distilled_student_reads_rgb_only_and_its_teacher_stays_frozen(tmp_path):
    teacher = _phg()
    student = _student(_teacher_ckpt(tmp_path, teacher))
    for k, v in teacher.state_dict().items():
        assert torch.equal(student.teacher.model.state_dict()[k], v), k  # loaded, width read from the weights
    x = torch.randn(4, 11, 16, 16)
    student.train()
    assert not student.teacher.training and not any(p.requires_grad for p in student.teacher.parameters())
    out = student({"x": x})
    assert out["keep"][:, 0].all() and not out["keep"][:, 1:].any()  # RGB in, every other block zero
    other = x.clone()
    other[:, 3:] = torch.randn(4, 8, 16, 16)
    student.eval()
    assert torch.equal(student({"x": x})["pred"], student({"x": other})["pred"])
    assert torch.equal(student.test_mask(4, "cpu", mode="all"), out["keep"])  # every eval mode is RGB only
    assert torch.allclose(out["soft"].sum(1), torch.ones(4, 16, 16), atol=1e-5)
    loss = DistillLoss(["rgb", "edges", "hsv", "blur", "semantic"], num_semantic=4)(out, {"x": x})
    loss.backward()
    assert student.net.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.teacher.parameters())


def test_distill_refuses_a_missing_or_foreign_teacher(tmp_path):
    with pytest.raises(ValueError, match="experiment=phg_mae_multimodal"):
        _student(None)
    assert _student(None, allow_random=True).teacher.model.net.out.out_channels == 11  # debug=smoke stand-in
    torch.save({"state_dict": {"model.encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a PHG-MAE checkpoint"):
        _student(str(tmp_path / "other.ckpt"))

    six = PHGMAE((3 + 1 + 2 + 1 + 6, 16, 16), ["rgb", "edges", "hsv", "blur", "semantic"], num_semantic=6, width=4)
    with pytest.raises(ValueError, match="does not match"):
        _student(_teacher_ckpt(tmp_path, six))


def test_distill_loss_is_soft_cross_entropy_and_the_student_learns_the_teacher(tmp_path):
    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    term = DistillLoss(mods, num_semantic=4)
    pred = torch.randn(2, 11, 4, 4)
    sem = torch.randint(4, (2, 4, 4))
    hard = torch.nn.functional.one_hot(sem, 4).permute(0, 3, 1, 2).float()
    assert torch.allclose(term({"pred": pred, "soft": hard}, {}), torch.nn.functional.cross_entropy(pred[:, 7:], sem))
    # a few Adam steps on 8 fixed frames: the student's KL to its teacher (loss - teacher entropy) falls
    student = _student(_teacher_ckpt(tmp_path, _phg()), teacher_mode="all")  # one deterministic target
    x = torch.randn(8, 11, 16, 16)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    kl = []
    for _ in range(40):
        out = student({"x": x})
        loss = term(out, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        kl.append(loss.item() + (out["soft"] * out["soft"].clamp_min(1e-12).log()).sum(1).mean().item())
    assert kl[-1] < 0.3 * kl[0]


# -- data and pseudo-labels -----------------------------------------------------------------------------


def _video_dm(tmp_path, labeled_fraction=0.5):
    """The real VideoModalitiesDataModule on two small clips of smooth random frames (no staged data needed)."""
    rng = np.random.default_rng(0)
    clips = {n: (rng.random((m, 4, 4, 3)).repeat(4, 1).repeat(4, 2) * 255).astype(np.uint8)
             for n, m in (("a", 24), ("b", 6))}
    np.savez(tmp_path / "clips.npz", **clips)
    return VideoModalitiesDataModule(str(tmp_path / "clips.npz"), ["rgb", "edges", "hsv", "blur", "semantic"],
                                     ["a"], ["b"], num_semantic=4, image_size=16,
                                     labeled_fraction=labeled_fraction, batch_size=8)


def test_pseudo_labels_become_targets_of_unlabelled_frames_and_flip_with_them(tmp_path):
    dm = _video_dm(tmp_path)
    ds = dm.train_set
    dm.trainer = SimpleNamespace(training=True)
    unl = ~ds.labeled
    assert 0 < unl.sum() < len(ds) and (ds.pseudo == NO_LABEL).all()
    raw = ds.__getitems__(list(range(len(ds))))
    plain = dm.on_after_batch_transfer(dict(raw))  # nothing written yet: labelled frames only
    assert torch.equal(plain["labeled"], ds.labeled)
    # the true maps written as pseudo-labels: after the random flips the swapped targets are exactly the maps
    # derived from the flipped frames, i.e. the pseudo maps were flipped with their frames
    ds.pseudo.copy_(dm.make(ds.frames)["sem"].to(torch.uint8))
    torch.manual_seed(0)
    out = dm.on_after_batch_transfer(ds.__getitems__(list(range(len(ds)))))
    torch.manual_seed(0)
    ref = dm.make(ds.frames, augment=True)
    assert out["labeled"].all()  # pseudo-labelled frames now count as labelled
    assert torch.equal(out["sem"], ref["sem"])
    assert not torch.equal(ref["sem"], dm.make(ds.frames)["sem"])  # some frames were flipped
    # a constant pseudo map replaces the target and the one-hot input block of unlabelled frames only
    ds.pseudo.fill_(2)
    out = dm.on_after_batch_transfer(ds.__getitems__(list(range(len(ds)))))
    assert (out["sem"][unl] == 2).all() and not (out["sem"][~unl] == 2).all()
    block = out["x"][:, dm.blocks["semantic"]]
    assert (block[unl][:, 2] == 1).all() and block[unl].sum(1).eq(1).all()
    # pixels left unlabelled (below the confidence threshold): no one-hot input, no loss
    ds.pseudo[:, :, :8] = NO_LABEL
    out = dm.on_after_batch_transfer(ds.__getitems__(list(range(len(ds)))))
    gone = out["sem"][unl] == NO_LABEL
    assert gone.float().mean() == 0.5 and out["labeled"].all()
    assert (out["x"][:, dm.blocks["semantic"]][unl].sum(1)[gone] == 0).all()

    ce = ModalityLoss("semantic", dm.names, num_semantic=4, kind="ce")
    pred = torch.randn(len(ds), 11, 16, 16)
    frame = int(unl.nonzero()[0])
    one = ce({"pred": pred[frame : frame + 1], "keep": None}, {k: v[frame : frame + 1] for k, v in out.items()})
    ref = torch.nn.functional.cross_entropy(pred[frame : frame + 1, 7:, :, 8:], out["sem"][frame : frame + 1, :, 8:])
    assert torch.allclose(one, ref)  # the mean over the labelled half only


def test_pseudo_label_rounds_write_the_ensemble_and_survive_a_checkpoint(tmp_path):
    dm = _video_dm(tmp_path)
    ds = dm.train_set
    model = PHGMAE(dm.input_shape, dm.names, num_semantic=4, width=2).train()
    logged = {}
    module = SimpleNamespace(model=model, device=torch.device("cpu"), log_dict=lambda d, **_: logged.update(d))
    trainer = SimpleNamespace(datamodule=dm, current_epoch=0)
    cb = PseudoLabelRounds(every_n_epochs=2, k=3)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_end(trainer, module)  # epoch 1 of every 2: nothing
    assert (ds.pseudo == NO_LABEL).all() and not logged
    trainer.current_epoch = 1
    cb.on_train_epoch_end(trainer, module)
    unl = ~ds.labeled
    assert (ds.pseudo[unl] != NO_LABEL).all() and (ds.pseudo[~unl] == NO_LABEL).all()
    assert model.training  # back in training mode
    g = torch.Generator().manual_seed(1)  # the callback's seed + epoch
    batch = dm.make(ds.frames[unl.nonzero().flatten()])
    expect = model.eval().predict_semantic(batch, k=3, generator=g).argmax(1)
    assert torch.equal(ds.pseudo[unl].long(), expect)
    assert 0 <= logged["pseudo/acc"] <= 1
    state = cb.state_dict()
    written = ds.pseudo.clone()
    ds.pseudo.fill_(NO_LABEL)  # a fresh process after resume
    again = PseudoLabelRounds(every_n_epochs=2, k=3)
    again.load_state_dict(state)
    again.on_train_start(trainer, module)
    assert torch.equal(ds.pseudo, written)
    with pytest.raises(ValueError, match="every_n_epochs"):
        PseudoLabelRounds(every_n_epochs=-1)
    # a confidence threshold keeps only the pixels the ensemble is sure of
    g = torch.Generator().manual_seed(1)
    conf, pred = model.eval().predict_semantic(batch, k=3, generator=g).max(1)
    tau = float(conf.min() + conf.max()) / 2
    sure = PseudoLabelRounds(every_n_epochs=1, k=3, min_confidence=tau)
    sure.setup(trainer, module, "fit")
    sure.on_train_epoch_end(trainer, module)
    assert 0 < (conf >= tau).float().mean() < 1
    assert torch.equal(ds.pseudo[unl].long(), torch.where(conf >= tau, pred, NO_LABEL))
    assert logged["pseudo/coverage"] == pytest.approx((conf >= tau).float().mean().item())
