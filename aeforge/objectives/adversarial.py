"""The adversarial loss term of VQGAN-style autoencoders (L1/L2 + LPIPS + GAN; cards 2, 3, 5, 7), trained by
`module=gan` (aeforge/modules/gan.py): the objective's other terms give the reconstruction loss L_rec, this
term adds  weight · λ · L_G  with the adaptive λ = ‖∇_w L_rec‖ / (‖∇_w L_G‖ + eps) (w = the model's
`last_layer_weight()`), and the discriminator it holds is trained on  L_D  by a second optimizer.

Both the generator term and the discriminator update are off before their start: `start_step` (generator
steps = batches) and `start_epoch` (read from batch["progress"]); the discriminator may start earlier
(`disc_start_step`/`disc_start_epoch`, RAE: D from epoch 6, the generator term from epoch 8).

Called as a plain term (`forward`, e.g. in validation) it returns the unweighted L_G for logging; the
GANModule leaves it out of val/loss. Under the plain AEModule (no discriminator updates) training refuses it."""

from __future__ import annotations

import torch
from torch import nn

from aeforge.nn.gan import GAN_LOSSES, adaptive_weight
from aeforge.objectives import LossTerm


class AdversarialLoss(LossTerm):
    def __init__(
        self,
        discriminator: nn.Module,
        weight: float = 1.0,
        start_step: int = 0,
        start_epoch: int = 0,
        disc_start_step: int | None = None,
        disc_start_epoch: int | None = None,
        adaptive: bool = True,
        max_weight: float = 1e4,
        eps: float = 1e-4,
        loss: str = "hinge",
        key_pred: str = "recon",
        key_target: str = "x",
    ):
        super().__init__(weight)
        if loss not in GAN_LOSSES:
            raise ValueError(f"objective adversarial loss={loss!r}; valid: {sorted(GAN_LOSSES)}")
        if not isinstance(discriminator, nn.Module):
            raise ValueError(
                f"objective adversarial discriminator must be an nn.Module (a _target_ node), got {type(discriminator)}"
            )
        for name, v in (("start_step", start_step), ("start_epoch", start_epoch),
                        ("disc_start_step", disc_start_step), ("disc_start_epoch", disc_start_epoch)):
            if v is not None and v < 0:
                raise ValueError(f"objective adversarial {name} must be >= 0, got {v}")
        self.discriminator = discriminator
        self.start_step, self.start_epoch = start_step, start_epoch
        self.disc_start_step = start_step if disc_start_step is None else disc_start_step
        self.disc_start_epoch = start_epoch if disc_start_epoch is None else disc_start_epoch
        self.adaptive, self.max_weight, self.eps = adaptive, max_weight, eps
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[loss]
        self.key_pred, self.key_target = key_pred, key_target

    # -- schedule -----------------------------------------------------------------------------------
    @staticmethod
    def _epoch(batch: dict) -> int | None:
        progress = batch.get("progress")
        return None if progress is None else progress.epoch

    def generator_active(self, batch: dict, step: int) -> bool:
        epoch = self._epoch(batch)
        return step >= self.start_step and (epoch is None or epoch >= self.start_epoch)

    def discriminator_active(self, batch: dict, step: int) -> bool:
        epoch = self._epoch(batch)
        return step >= self.disc_start_step and (epoch is None or epoch >= self.disc_start_epoch)

    # -- losses -------------------------------------------------------------------------------------
    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        """The unweighted generator loss L_G (logged in validation; 0 before the start)."""
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError(
                "the adversarial loss term trains only under module=gan (aeforge/modules/gan.py), which also "
                "updates its discriminator: add `- override /module: gan` to the recipe"
            )
        progress = batch.get("progress")
        step = progress.step if progress is not None else self.start_step  # evaluation: training is done
        fake = outputs[self.key_pred]
        if not self.generator_active(batch, step):
            return fake.new_zeros(()).float()
        return self.g_loss_fn(self.discriminator(fake))

    def generator_loss(
        self, outputs: dict, batch: dict, rec_loss: torch.Tensor, last_layer_weight: torch.Tensor | None, step: int
    ) -> dict[str, torch.Tensor]:
        """{"g_loss": L_G, "d_weight": λ (1 when not adaptive), "loss": weight · λ · L_G}; all 0 before the start."""
        fake = outputs[self.key_pred]
        if not self.generator_active(batch, step):
            zero = fake.new_zeros(()).float()
            return {"g_loss": zero, "d_weight": zero, "loss": zero}
        g_loss = self.g_loss_fn(self.discriminator(fake))
        if self.adaptive:
            if last_layer_weight is None:
                raise ValueError(
                    "objective adversarial adaptive=true needs the model's last_layer_weight() (its decoder's final "
                    "weight); this model has none: set adaptive=false"
                )
            d_weight = adaptive_weight(rec_loss, g_loss, last_layer_weight, self.max_weight, self.eps)
        else:
            d_weight = torch.ones((), device=g_loss.device)
        return {"g_loss": g_loss, "d_weight": d_weight, "loss": self.weight * d_weight * g_loss}

    def discriminator_loss(self, outputs: dict, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """{"d_loss": L_D on detached reconstructions, "logits_real", "logits_fake": mean logits}; 0 before the
        start (the discriminator is then not run)."""
        real, fake = batch[self.key_target].detach(), outputs[self.key_pred].detach()
        if not self.discriminator_active(batch, step):
            zero = fake.new_zeros(()).float()
            return {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        real_logits, fake_logits = self.discriminator(real.to(fake.dtype)), self.discriminator(fake)
        return {
            "d_loss": self.d_loss_fn(real_logits, fake_logits),
            "logits_real": real_logits.detach().float().mean(),
            "logits_fake": fake_logits.detach().float().mean(),
        }


def adversarial_terms(objective: nn.Module) -> dict[str, AdversarialLoss]:
    """The objective's adversarial terms by name."""
    terms = getattr(objective, "terms", {})
    return {name: t for name, t in terms.items() if isinstance(t, AdversarialLoss)}
