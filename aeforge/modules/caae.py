"""CAAE's adversarial game (`module=caae`) under Lightning's manual optimisation: per batch one update each
of E+G, D_z and D_img, in that order, on the same batch (card 8). Three optimizers of the `optim` settings
(the card: Adam, lr 2e-4, betas (0.5, 0.999) for all three), each with its own lr schedule.

Kept from AEModule: the NaN/Inf guard (each player's loss is checked before its update; Lightning calls
`on_before_optimizer_step` for every manual step, so non-finite gradients stop or skip that update),
epoch means of every logged value, the online probe is refused (it would need a fourth optimizer), and the
RNG states in checkpoints. Lightning saves the states of all three optimizers and schedulers.

Lightning counts every optimizer step in `global_step` under manual optimisation: 3 per batch once the
discriminators train (1 during the pure-AE start), so `trainer.max_steps` counts optimiser steps; recipes
set `trainer.max_epochs`. Each player's update uses only its own parameters (`toggle_optimizer` freezes the
others), and the discriminators' BN statistics move only in their own update (aeforge/models/caae.py)."""

from __future__ import annotations

import warnings

import torch

from aeforge.modules.base import AEModule
from aeforge.modules.optim import warmup_cosine, warmup_steps

PLAYERS = ("eg", "d_z", "d_img")


class CAAEModule(AEModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.probe is not None:
            raise ValueError("module=caae: online_probe is not supported (the three players own all updates)")
        if not hasattr(self.objective, "latent_discriminator_loss"):
            raise ValueError(f"module=caae needs objective=caae (CAAEObjective), got {type(self.objective).__name__}")
        self.automatic_optimization = False

    # -- optimisation -------------------------------------------------------------------------------
    def player_parameters(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        named = list(self.model.named_parameters())
        disc = {"d_z": ("d_z.",), "d_img": ("d_img.",)}
        groups = {k: [(n, p) for n, p in named if n.startswith(v)] for k, v in disc.items()}
        taken = {id(p) for g in groups.values() for _, p in g}
        return {"eg": [(n, p) for n, p in named if id(p) not in taken], **groups}

    def param_groups(self, lr: float, player: str = "eg") -> list[dict]:
        o = self.optim
        decay, no_decay = [], []
        for name, p in self.player_parameters()[player]:
            if not p.requires_grad:
                continue
            (no_decay if o.no_decay_1d and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        o = self.optim
        lr = self.base_lr()
        fused = o.fused if o.fused is not None else (self.device.type == "cuda" or None)
        # schedules count batches (each scheduler steps once per batch), not Lightning's global_step
        total = int(self.trainer.estimated_stepping_batches)
        warmup = warmup_steps(o, self.trainer)
        optimizers, schedulers = [], []
        for player in PLAYERS:
            groups = self.param_groups(lr, player)
            if o.optimizer in ("adamw", "adam"):
                cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
                opt = cls(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
            else:
                opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
            fn = lambda step: warmup_cosine(step, warmup, total, lr, o.min_lr, o.schedule == "cosine")
            optimizers.append(opt)
            schedulers.append({"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, fn), "interval": "step"})
        return optimizers, schedulers

    # -- the game -----------------------------------------------------------------------------------
    def _update(self, opt, loss_fn) -> dict[str, torch.Tensor]:
        """One player's update: forward with only its parameters trainable, NaN check, backward, step."""
        self.toggle_optimizer(opt)
        try:
            losses = loss_fn()
            self._bad_loss = False
            if self._check_due():
                self._bad_loss = self.check_finite(losses, stop=self.nonfinite == "stop")
            opt.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            opt.step()  # Lightning runs on_before_optimizer_step (the gradient guard) inside
        finally:
            self.untoggle_optimizer(opt)
        return losses

    def training_step(self, batch, batch_idx):
        opt_eg, opt_dz, opt_dimg = self.optimizers()
        batch = self.with_progress(batch)
        saved: dict[str, torch.Tensor] = {}

        def generator():
            out = self.model(batch)
            saved.update(z=out["z"].detach(), recon=out["recon"].detach(), cond=out["cond"])
            return self.objective(out, batch)

        losses = self._update(opt_eg, generator)
        logged = {k: v.detach() for k, v in losses.items()}
        skipped = [self._bad_loss]
        if self.objective.adversarial(batch):  # after the pure-AE start
            def latent():
                d = self.model.latent_discriminator_outputs(saved["z"])
                return {"loss": self.objective.latent_discriminator_loss(d)}

            def image():
                d = self.model.image_discriminator_outputs(batch["x"], saved["recon"], saved["cond"])
                return {"loss": self.objective.image_discriminator_loss(d)}

            logged["d_z_loss"] = self._update(opt_dz, latent)["loss"].detach()
            skipped.append(self._bad_loss)
            logged["d_img_loss"] = self._update(opt_dimg, image)["loss"].detach()
            skipped.append(self._bad_loss)
        with warnings.catch_warnings():
            # during the pure-AE start the discriminators' schedules advance with the batches, before their
            # optimizers first step: intended (they follow the run's batch count), not the misuse torch warns of
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for sched in self.lr_schedulers():
                sched.step()
        self.after_optimizer_step(self.global_step)
        self._record(logged, bad=any(skipped))

    def _record(self, logged: dict[str, torch.Tensor], bad: bool) -> None:
        if not bad:  # a skipped update stays out of the epoch means
            for k, v in logged.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._count += 1
        if self.trainer.fit_loop.total_batch_idx % self.trainer.log_every_n_steps == 0:  # batches, not steps
            self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False)
            self.log("loss", logged["loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
            self.log("train/lr", self.optimizers()[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
