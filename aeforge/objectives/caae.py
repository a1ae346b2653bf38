"""CAAE losses (card 8): the E/G loss as weighted terms, and the two discriminators' losses.

E/G:    recon * |x - G(E(x), l)|  (L1 mean, the official code; `recon_loss: l2` is the paper's L2)
      + adv_img * BCE(D_img(G, l), 1) + adv_z * BCE(D_z(E(x)), 1) + tv * TV(G)
D_z:    BCE(D_z(z*), 1) + BCE(D_z(E(x)), 0),  z* ~ U(-1, 1)^d
D_img:  BCE(D_img(x, l), 1) + BCE(D_img(G, l), 0)
During the first `pretrain_epochs` epochs (read from batch["progress"]) the adversarial terms stay out of the
E/G loss (they are still logged) and the discriminators are not updated: the official pure-AE start."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeforge.objectives import LossTerm, Objective

ADVERSARIAL = ("adv_img", "adv_z")


def total_variation(img: torch.Tensor) -> torch.Tensor:
    """The official TV: (½ Σ (∂_y G)² + ½ Σ (∂_x G)²) / image side / batch (TF's l2_loss halves)."""
    dy = img[:, :, 1:, :] - img[:, :, :-1, :]
    dx = img[:, :, :, 1:] - img[:, :, :, :-1]
    return (0.5 * dy.pow(2).sum() + 0.5 * dx.pow(2).sum()) / img.shape[-1] / img.shape[0]


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


class ConditionalRecon(LossTerm):
    def __init__(self, weight: float = 1.0, loss: str = "l1"):
        super().__init__(weight)
        if loss not in ("l1", "l2"):
            raise ValueError(f"objective.recon_loss={loss!r}; valid: ['l1', 'l2']")
        self.loss = loss

    def forward(self, outputs, batch):
        diff = outputs["recon"].float() - batch["x"].float()
        return diff.abs().mean() if self.loss == "l1" else diff.pow(2).mean()


class TotalVariation(LossTerm):
    def forward(self, outputs, batch):
        return total_variation(outputs["recon"].float())


class FoolImageDiscriminator(LossTerm):
    def forward(self, outputs, batch):
        return _bce(outputs["dimg_fake"], 1.0)


class FoolLatentDiscriminator(LossTerm):
    def forward(self, outputs, batch):
        return _bce(outputs["dz_fake"], 1.0)


class CAAEObjective(Objective):
    """Weights default to the official TF code: (adv_img, adv_z, tv) = (1e-4, 0, 0) beside L1 recon 1."""

    def __init__(
        self,
        recon: float = 1.0,
        recon_loss: str = "l1",
        tv: float = 0.0,
        adv_img: float = 1e-4,
        adv_z: float = 0.0,
        pretrain_epochs: int = 0,
    ):
        if pretrain_epochs < 0:
            raise ValueError(f"objective.pretrain_epochs must be >= 0, got {pretrain_epochs}")
        super().__init__({
            "recon": ConditionalRecon(weight=recon, loss=recon_loss),
            "tv": TotalVariation(weight=tv),
            "adv_img": FoolImageDiscriminator(weight=adv_img),
            "adv_z": FoolLatentDiscriminator(weight=adv_z),
        })
        self.pretrain_epochs = pretrain_epochs

    def adversarial(self, batch: dict) -> bool:
        """Whether this batch is past the pure-AE start (no progress, as in evaluation: training is done)."""
        progress = batch.get("progress")
        return progress is None or progress.epoch >= self.pretrain_epochs

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        values = {name: self._call(name, term, outputs, batch) for name, term in self.terms.items()}
        live = [n for n in values if n not in ADVERSARIAL or self.adversarial(batch)]
        return {"loss": sum(self.terms[n].weight * values[n] for n in live), **values}

    def latent_discriminator_loss(self, d: dict) -> torch.Tensor:
        return _bce(d["dz_prior"], 1.0) + _bce(d["dz_post"], 0.0)

    def image_discriminator_loss(self, d: dict) -> torch.Tensor:
        return _bce(d["dimg_real"], 1.0) + _bce(d["dimg_gen"], 0.0)
