"""CAAE (card 8): each player's update moves only its own weights (and BN statistics), TV against its formula,
exact resume of the three-optimizer manual loop, a tiny run's losses and the condition's effect on G, the
conditional-generation evaluator on a model that renders the target class, and errors on bad input.
Real-data proof: scripts/proof_caae.py (`benchmark` test at the end)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from aeforge.data.images import SyntheticImageDataModule
from aeforge.eval import Evaluation
from aeforge.eval.conditional import ConditionalGeneration
from aeforge.models.caae import CAAE
from aeforge.modules.caae import CAAEModule
from aeforge.modules.optim import OptimSettings
from aeforge.objectives.caae import CAAEObjective, total_variation
from aeforge.objectives.reconstruction import PixelMSE
from tests.conftest import load_script, needs_data

K = 3


def _datamodule(batch_size: int = 6) -> SyntheticImageDataModule:
    return SyntheticImageDataModule(num_train=24, num_val=12, num_classes=K, channels=1, image_size=8,
                                    batch_size=batch_size, num_workers=0, mean=[0.5], std=[0.5])


def _module(seed: int = 0) -> CAAEModule:
    torch.manual_seed(seed)
    model = CAAE((1, 8, 8), K, latent_dim=4, enc_channels=[4], gen_channels=[4], gen_tail_channels=[3],
                 kernel_size=3, dz_hidden=[8], dimg_channels=[4, 4], dimg_hidden=8)
    objective = CAAEObjective(tv=0.1, adv_img=0.1, adv_z=0.1)
    optim = OptimSettings(optimizer="adam", lr=1e-2, betas=[0.5, 0.999], schedule="constant")
    return CAAEModule(model=model, objective=objective, optim=optim)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


class Snapshots(pl.Callback):
    """The model's state before each batch and before each optimizer step (after its backward)."""

    def __init__(self):
        self.states: list[tuple[str, dict]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(("start", _state(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        idx = [o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers].index(optimizer)
        self.states.append((("eg", "d_z", "d_img")[idx], _state(pl_module)))

    def on_train_end(self, trainer, pl_module):
        self.states.append(("end", _state(pl_module)))


def _trainer(tmp_path, epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1, callbacks=list(callbacks),
                      default_root_dir=tmp_path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2 epochs x 2 batches, with the state around every update; checkpoint after epoch 1 of a second run."""
    tmp = tmp_path_factory.mktemp("caae")
    snaps = Snapshots()
    module = _module()
    trainer = _trainer(tmp, 2, [snaps])
    trainer.fit(module, datamodule=_datamodule())
    cut = _module()
    cut_trainer = _trainer(tmp, 1)
    cut_trainer.fit(cut, datamodule=_datamodule())
    cut_trainer.save_checkpoint(tmp / "cut.ckpt")
    return module, trainer, snaps.states, tmp / "cut.ckpt"


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def _player(key: str) -> str:
    return "d_z" if key.startswith("d_z.") else "d_img" if key.startswith("d_img.") else "eg"


def test_each_update_changes_only_its_own_weights(straight):
    """The state before each step is after that player's forward and backward: a discriminator's BN
    statistics move in its own forward, its weights in its own step; nothing else changes."""
    _, _, states, _ = straight
    names = [n for n, _ in states]
    assert names == ["start", "eg", "d_z", "d_img"] * 4 + ["end"]
    buffer = lambda k: "running_" in k or "num_batches" in k  # noqa: E731
    for i in range(0, 16, 4):
        start, eg, dz, dimg, after = (states[j][1] for j in range(i, i + 5))
        # the E/G forward and backward read both discriminators and leave them (BN statistics included) as is
        assert not _changed(start, eg)
        moved = _changed(eg, dz)  # E/G update (+ D_z's forward: its BN statistics)
        assert {k for k in moved if not buffer(k)} and {_player(k) for k in moved if not buffer(k)} == {"eg"}
        assert {_player(k) for k in moved if buffer(k)} == {"d_z"}
        moved = _changed(dz, dimg)  # D_z update (+ D_img's forward)
        assert {_player(k) for k in moved if not buffer(k)} == {"d_z"}
        assert {_player(k) for k in moved if buffer(k)} == {"d_img"}
        moved = _changed(dimg, after)  # D_img update
        assert moved and {_player(k) for k in moved} == {"d_img"} and not any(buffer(k) for k in moved)


def test_tiny_run_finite_and_generator_follows_condition(straight):
    module, trainer, _, _ = straight
    metrics = trainer.callback_metrics
    for k in ("train/recon_epoch", "train/adv_img_epoch", "train/adv_z_epoch", "train/d_z_loss_epoch",
              "train/d_img_loss_epoch", "train/tv_epoch", "val/loss"):
        assert torch.isfinite(metrics[k]), k
    model = module.model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        outs = [model.generate({"x": x}, torch.full((5,), k)) for k in range(K)]
        own = model.reconstruct({"x": x, "y": torch.full((5,), 1)})
    torch.testing.assert_close(own, outs[1])
    assert all((outs[i] - outs[j]).abs().mean() > 1e-4 for i in range(K) for j in range(i))
    # the gradient of G's output reaches the condition input
    cond = model.one_hot(torch.zeros(5, dtype=torch.long)).requires_grad_(True)
    model.decode(model.encode({"x": x}), cond).sum().backward()
    assert cond.grad.abs().sum() > 0


def test_resume_restores_all_optimizers_and_continues_exactly(straight, tmp_path):
    module, _, _, ckpt_path = straight
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 3 and len(ckpt["lr_schedulers"]) == 3
    assert all(s["state"] for s in ckpt["optimizer_states"])  # Adam moments of every player
    resumed = _module(seed=1)  # other initial weights: all must come from the checkpoint
    trainer = _trainer(tmp_path, 2)
    trainer.fit(resumed, datamodule=_datamodule(), ckpt_path=str(ckpt_path), weights_only=True)
    a, b = _state(module), _state(resumed)
    assert not _changed(a, b), _changed(a, b)
    for opt_a, opt_b in zip(module.optimizers(), resumed.optimizers()):
        for sa, sb in zip(opt_a.optimizer.state.values(), opt_b.optimizer.state.values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_total_variation_matches_formula():
    torch.manual_seed(0)
    img = torch.randn(3, 2, 5, 6)
    tv = 0.0
    for b in range(3):
        for c in range(2):
            for i in range(5):
                for j in range(6):
                    if i + 1 < 5:
                        tv += 0.5 * float(img[b, c, i + 1, j] - img[b, c, i, j]) ** 2
                    if j + 1 < 6:
                        tv += 0.5 * float(img[b, c, i, j + 1] - img[b, c, i, j]) ** 2
    assert total_variation(img).item() == pytest.approx(tv / 6 / 3, rel=1e-5)


def test_pretrain_epochs_keep_adversarial_terms_out_of_the_loss():
    from aeforge.models.base import RunProgress

    obj = CAAEObjective(adv_img=1.0, adv_z=1.0, pretrain_epochs=2)
    out = {"recon": torch.zeros(2, 1, 4, 4), "dz_fake": torch.zeros(2), "dimg_fake": torch.zeros(2)}
    batch = {"x": torch.ones(2, 1, 4, 4)}
    early = obj(out, {**batch, "progress": RunProgress.of(0, 10, 1)})
    late = obj(out, {**batch, "progress": RunProgress.of(5, 10, 2)})
    assert early["loss"].item() == pytest.approx(1.0)  # L1 only
    assert late["loss"].item() == pytest.approx(1.0 + 2 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)


class _Oracle(torch.nn.Module):
    """Renders the target class's mean training image: a perfect conditional generator."""

    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.means = means

    def reconstruct(self, batch):
        return self.means[batch["y"]]

    def generate(self, batch, labels):
        return self.means[labels]


class _Unconditional(torch.nn.Module):
    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.means = means

    def reconstruct(self, batch):
        return self.means[batch["y"]]


def test_conditional_evaluator_reads_target_condition(tmp_path):
    dm = _datamodule()
    x = dm.normalize(dm.train_set.x)
    means = torch.stack([x[dm.train_set.y == k].mean(0) for k in range(K)])
    ev = Evaluation({"c": ConditionalGeneration(classifier_epochs=20, classifier_channels=[8], classifier_lr=1e-2,
                                                classifier_batch_size=8, out_dir=str(tmp_path))}, batch_size=12)
    m = ev(_Oracle(means), dm, torch.device("cpu"))
    assert m["c/real_acc"] > 0.9 and m["c/moved_acc"] > 0.9 and m["c/chance"] == pytest.approx(1 / K)
    assert (tmp_path / "conditional_grid.png").is_file()
    # an unconditional model (no generate) outputs its reconstruction at every target: moved_acc ~ 0
    unconditional = _Unconditional(means)
    m = ev(unconditional, dm, torch.device("cpu"))
    assert m["c/moved_acc"] < 0.1 and m["c/own_acc"] > 0.9


def test_bad_input_names_the_key():
    with pytest.raises(ValueError, match="enc_channels"):
        CAAE((1, 28, 28), 10, enc_channels=[8, 8, 8], gen_channels=[8, 8, 8])
    with pytest.raises(ValueError, match="labelled"):
        CAAE((1, 8, 8), None, enc_channels=[4], gen_channels=[4])
    model = CAAE((1, 8, 8), K, latent_dim=4, enc_channels=[4], gen_channels=[4], dz_hidden=[4],
                 dimg_channels=[4], dimg_hidden=4)
    with pytest.raises(KeyError, match="condition_key"):
        model({"x": torch.zeros(2, 1, 8, 8)})
    from aeforge.objectives import Objective

    with pytest.raises(ValueError, match="objective=caae"):
        CAAEModule(model=model, objective=Objective({"r": PixelMSE()}), optim=OptimSettings())


@pytest.mark.benchmark
@needs_data("mnist", "mnist.npz")
def test_proof_caae_moves_condition(capsys):
    """CPU proof on MNIST (minutes): scripts/proof_caae.py. What the measured run supports (docs/methods/caae.md):
    CAAE's moved-condition accuracy is above the unconditional AE's and the conditional AE's, while the
    reconstruction holds; a large margin over chance did NOT reproduce at this budget."""
    result = load_script("proof_caae").main(["--quick"])
    print(json.dumps(result))
    caae, ae, cond = result["runs"]["caae"], result["runs"]["ae"], result["runs"]["cond_ae"]
    assert caae["moved_acc"] > ae["moved_acc"] and caae["moved_acc"] > cond["moved_acc"]
    assert caae["psnr"] > 14 and caae["own_acc"] > 0.8
