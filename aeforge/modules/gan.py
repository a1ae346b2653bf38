"""VQGAN-style adversarial training (`module=gan`) under Lightning's manual optimisation: optimizer 1 updates the
model (and any trainable objective parameters, e.g. a learned log-variance), optimizer 2 the discriminator(s)
of the objective's `AdversarialLoss` term(s) (aeforge/objectives/adversarial.py).

Per batch: model forward; the objective's other terms give L_rec; each adversarial term adds
weight · λ · L_G (λ the adaptive weight on the model's `last_layer_weight()`); generator step; then the
discriminator step on the detached reconstructions of that same forward. Both are off before their start
(the term's start_step/start_epoch and disc_start_*): the generator term is 0 and optimizer 2 does not step.

`global_step` counts generator steps only, one per batch (the discriminator's step goes straight to the
strategy, not through Lightning's step counter), so `trainer.max_steps`, the lr schedules, `start_step` and
`batch["progress"]` all count batches, as under AEModule. Kept from AEModule: the NaN/Inf guard (each loss
before its update; Lightning's `on_before_optimizer_step` runs for both steps), logging and epoch means, the
model's `on_train_step_end` hook, RNG states and loader position in checkpoints (Lightning saves both optimizers
and schedulers). Not supported: the online probe, automatic gradient clipping and accumulation (Lightning
refuses those under manual optimisation; `clip_grad` clips here instead)."""

from __future__ import annotations

import warnings

import torch

from aeforge.modules.base import AEModule
from aeforge.modules.optim import warmup_cosine, warmup_steps
from aeforge.objectives import Objective
from aeforge.objectives.adversarial import adversarial_terms


class GANModule(AEModule):
    def __init__(
        self,
        *args,
        disc_lr: float | None = None,
        disc_betas: list[float] | None = None,
        clip_grad: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.probe is not None:
            raise ValueError("module=gan: online_probe is not supported (two optimizers own all updates)")
        if type(self.objective).forward is not Objective.forward:
            raise ValueError(
                f"module=gan composes the loss from objective.terms itself; {type(self.objective).__name__} "
                "overrides Objective.forward, which would be bypassed: use a plain Objective with terms"
            )
        self.adversarial = adversarial_terms(self.objective)
        if not self.adversarial:
            raise ValueError(
                "module=gan needs an AdversarialLoss term (aeforge.objectives.adversarial.AdversarialLoss) in "
                f"objective.terms; the terms are {sorted(self.objective.terms)}"
            )
        if disc_betas is not None and len(disc_betas) != 2:
            raise ValueError(f"module.disc_betas must be two numbers, got {disc_betas}")
        if clip_grad is not None and clip_grad <= 0:
            raise ValueError(f"module.clip_grad must be > 0 or null, got {clip_grad}")
        self.disc_lr, self.disc_betas, self.clip_grad = disc_lr, disc_betas, clip_grad
        self.automatic_optimization = False

    # -- optimisation -------------------------------------------------------------------------------
    def discriminator_parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.adversarial.values() for p in t.discriminator.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict]:
        disc = {id(p) for t in self.adversarial.values() for p in t.discriminator.parameters()}
        groups = super().param_groups(lr)
        for g in groups:  # the base adds all objective parameters: keep the trainable, non-discriminator ones
            g["params"] = [p for p in g["params"] if id(p) not in disc and p.requires_grad]
        return [g for g in groups if g["params"]]

    def _optimizer(self, groups: list[dict], lr: float, betas) -> torch.optim.Optimizer:
        o = self.optim
        fused = o.fused if o.fused is not None else (self.device.type == "cuda" or None)
        if o.optimizer in ("adamw", "adam"):
            cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
            return cls(groups, lr=lr, betas=tuple(betas), eps=o.eps, fused=fused)
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)

    def configure_optimizers(self):
        o = self.optim
        lr = self.base_lr()
        d_lr = self.disc_lr if self.disc_lr is not None else lr
        decay, no_decay = [], []
        for p in self.discriminator_parameters():
            (no_decay if o.no_decay_1d and p.ndim <= 1 else decay).append(p)
        d_groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        opt_g = self._optimizer(self.param_groups(lr), lr, o.betas)
        opt_d = self._optimizer(d_groups, d_lr, self.disc_betas or o.betas)
        total = int(self.trainer.estimated_stepping_batches)  # batches: each scheduler steps once per batch
        warmup = warmup_steps(o, self.trainer)
        cosine = o.schedule == "cosine"
        scheds = [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s, base=base: warmup_cosine(s, warmup, total, base,
                                                                                      o.min_lr, cosine))
            for opt, base in ((opt_g, lr), (opt_d, d_lr))
        ]
        return [opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in scheds]

    # -- losses -------------------------------------------------------------------------------------
    def generator_losses(self, out: dict, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """The objective's terms with the adversarial ones adaptively weighted: {"loss", "rec_loss", <term>…,
        <adv term>_weight, <metric>…}."""
        terms = self.objective.terms
        values = {n: Objective._call(n, t, out, batch) for n, t in terms.items() if n not in self.adversarial}
        rec = sum((terms[n].weight * v for n, v in values.items()), torch.zeros((), device=self.device))
        last = getattr(self.model, "last_layer_weight", None)
        total = rec
        for name, term in self.adversarial.items():
            g = term.generator_loss(out, batch, rec, last() if last is not None else None, step)
            values[name], values[f"{name}_weight"] = g["g_loss"], g["d_weight"]
            total = total + g["loss"]
        with torch.no_grad():
            metrics = {n: Objective._call(n, m, out, batch) for n, m in self.objective.metrics.items()}
        return {"loss": total, "rec_loss": rec.detach(), **values, **metrics}

    def _losses(self, out: dict, batch) -> dict[str, torch.Tensor]:
        """Validation / test: the adversarial terms are logged (unweighted L_G) but kept out of `loss`, so the
        monitored value does not follow the discriminator's state."""
        losses = self.objective(out, batch)
        for name, term in self.adversarial.items():
            losses["loss"] = losses["loss"] - term.weight * losses[name]
        return losses

    # -- the step -----------------------------------------------------------------------------------
    def _clip(self, opt) -> None:
        if self.clip_grad is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip_grad, gradient_clip_algorithm="norm")

    def _guard(self, losses: dict[str, torch.Tensor]) -> bool:
        self._bad_loss = False
        if self._check_due():
            self._bad_loss = self.check_finite(losses, stop=self.nonfinite == "stop")
        return self._bad_loss

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        batch = self.with_progress(batch)
        step = self.global_step  # generator steps done = batches done

        self.toggle_optimizer(opt_g)  # the discriminators get no gradient from the generator's loss
        try:
            out = self.model(batch)
            losses = self.generator_losses(out, batch, step)
            skipped = [self._guard(losses)]
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            self._clip(opt_g)
            opt_g.step()  # the gradient guard runs inside (on_before_optimizer_step)
        finally:
            self.untoggle_optimizer(opt_g)
        logged = {k: v.detach() for k, v in losses.items()}

        if any(t.discriminator_active(batch, step) for t in self.adversarial.values()):
            self.toggle_optimizer(opt_d)
            try:
                d_losses = {}
                for name, term in self.adversarial.items():
                    d_losses.update({f"{name}_{k}": v for k, v in term.discriminator_loss(out, batch, step).items()})
                d_loss = sum(d_losses[f"{n}_d_loss"] for n in self.adversarial)
                skipped.append(self._guard({"d_loss": d_loss}))
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                self._clip(opt_d)
                # straight to the strategy: precision plugin, gradient guard and AMP scaler as usual, but
                # Lightning's global_step does not count it
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
            finally:
                self.untoggle_optimizer(opt_d)
            logged.update({k: v.detach() for k, v in d_losses.items()})

        with warnings.catch_warnings():
            # before the discriminator starts its schedule advances with the batches while its optimizer has
            # not stepped yet: intended (it follows the run's batch count), not the misuse torch warns of
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for sched in self.lr_schedulers():
                sched.step()
        self.after_optimizer_step(self.global_step)
        self._record(logged, step, bad=any(skipped))

    def _record(self, logged: dict[str, torch.Tensor], step: int, bad: bool) -> None:
        if not bad:  # a skipped update stays out of the epoch means
            for k, v in logged.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._count += 1
        if step % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False)
            self.log("loss", logged["loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
            self.log("train/lr", self.optimizers()[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
