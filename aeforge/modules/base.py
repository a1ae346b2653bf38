"""The one thin LightningModule: model + objective in, optimisation, logging and hooks out.

Methods that need their own loop (several optimisers, adversarial games) subclass `AEModule` and are
selected with the `module` config group (`module=sae`, or `override /module: …` in their experiment).
Nothing here writes into the model, the DataModule or the objective: run progress reaches them as arguments
(`model.on_train_step_end(step, total)`), never as attributes set from outside (docs/architecture.md)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel, RunProgress
from aeforge.modules.optim import OptimSettings, warmup_cosine, warmup_steps
from aeforge.objectives import Objective

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss or a weight becomes NaN/Inf; the last checkpoint on disk is left untouched."""


def _numpy_state_to_safe(state) -> list:
    """numpy's RNG state with its key array as a tensor, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


class AEModule(pl.LightningModule):
    def __init__(
        self,
        model: AutoencoderModel,
        objective: Objective,
        optim: OptimSettings,
        online_probe: bool = False,
        probe_lr: float = 1e-3,
        num_classes: int | None = None,
        feature_dim: int | None = None,
        nonfinite: str = "stop",
    ):
        super().__init__()
        self.model, self.objective, self.optim = model, objective, optim
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"module.nonfinite must be stop or skip, got {nonfinite!r}")
        self.nonfinite, self.skipped_steps, self._bad_loss = nonfinite, 0, False
        self.probe = None
        if online_probe:
            if not num_classes or not feature_dim:
                raise ValueError("module.online_probe=true needs labelled data (the DataModule has no num_classes)")
            # BN without affine + linear, as MAE's linear probe; trained on detached features
            self.probe = nn.Sequential(
                nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), nn.Linear(feature_dim, num_classes)
            )
        self.probe_lr = probe_lr
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._rng_to_restore = None
        self._total_steps = None

    # -- steps --------------------------------------------------------------------------------------
    def _step(self, batch) -> dict[str, torch.Tensor]:
        batch = self.with_progress(batch)
        return self._losses(self.model(batch), batch)

    def with_progress(self, batch: dict) -> dict:
        """The batch plus `progress` (a new dict: the DataModule's batch is not changed). The one way run
        progress reaches models and loss terms (docs/architecture.md, "State flows one way")."""
        if self._trainer is None:
            return batch
        if self._total_steps is None:  # Lightning recomputes this property on every read
            self._total_steps = self.trainer.estimated_stepping_batches
        progress = RunProgress.of(self.global_step, self._total_steps, self.current_epoch)
        return {**batch, "progress": progress}

    def _losses(self, out: dict, batch) -> dict[str, torch.Tensor]:
        losses = self.objective(out, batch)
        if self.probe is not None and "y" in batch:
            with torch.no_grad():
                feats = self.model.encode(batch)
            logits = self.probe(feats.detach().float())
            losses["probe_loss"] = F.cross_entropy(logits, batch["y"])
            losses["probe_acc"] = (logits.argmax(1) == batch["y"]).float().mean()
            losses["loss"] = losses["loss"] + losses["probe_loss"]
        return losses

    def training_step(self, batch, batch_idx):
        losses = self._step(batch)
        loss = losses["loss"]
        every = self.trainer.log_every_n_steps
        self._bad_loss = False
        if self._check_due():
            self._bad_loss = self.check_finite(losses, stop=self.nonfinite == "stop")
        if not self._bad_loss:  # a skipped step stays out of the epoch means (its gradients skip the update)
            for k, v in losses.items():
                v = v.detach()
                self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._count += 1
        if self.global_step % every == 0:  # logging every step costs ~10% of GPU throughput
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False)
            self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self):
        if self._count:
            means = {f"train/{k}_epoch": v / self._count for k, v in self._sums.items()}
            self.check_finite(means)
            self.log_dict(means, on_step=False, on_epoch=True, sync_dist=True)
        if self.nonfinite == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=False, on_epoch=True)
        self._sums, self._count = {}, 0

    def validation_step(self, batch, batch_idx):
        losses = self._step(batch)
        bs = batch["x"].shape[0] if "x" in batch else None
        self.log_dict({f"val/{k}": v.detach() for k, v in losses.items()}, on_epoch=True, batch_size=bs, sync_dist=True)

    def test_step(self, batch, batch_idx):
        losses = self._step(batch)
        self.log_dict({f"test/{k}": v.detach() for k, v in losses.items()}, on_epoch=True, sync_dist=True)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Lightning counts the step only after this hook returns
        self.after_optimizer_step(self.global_step + 1)

    def after_optimizer_step(self, step: int) -> None:
        """State changes that belong to the update just made (`step` updates done). Here rather than in
        on_train_batch_end: the callbacks' on_train_batch_end runs first and may write a checkpoint, which
        must hold the state the next step starts from, or a resumed run diverges."""
        hook = getattr(self.model, "on_train_step_end", None)  # codebook restarts, decoder renormalisation
        if hook is not None:
            hook(step, self.trainer.estimated_stepping_batches)

    def _check_due(self) -> bool:
        # a NaN/Inf check costs a device sync: every step on CPU or when skipping, at logging steps on accelerators
        every = self.trainer.log_every_n_steps
        return self.nonfinite == "skip" or self.device.type == "cpu" or self.global_step % every == 0

    def on_before_optimizer_step(self, optimizer):
        """After backward, before clipping and the update: non-finite gradients stop the run (module.nonfinite=stop)
        or skip this update (skip: the gradients are dropped, so the optimizer leaves weights and state alone;
        the scheduler still advances, as with AMP's loss scaler). Under a GradScaler (16-mixed) the scaler
        itself skips overflowing steps: an Inf gradient is routine there."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None or not self._check_due():
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        bad = self._bad_loss or bool(grads) and not bool(
            torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all()
        )
        if self.nonfinite == "skip":  # every rank skips, or the replicas drift apart
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite gradient at step {self.global_step} (epoch {self.current_epoch}). Training stopped "
                f"before the optimizer step; the checkpoints on disk hold the last good weights (module.nonfinite="
                f"skip skips such steps instead)."
            )
        log.warning("non-finite loss or gradient at step %d: update skipped (module.nonfinite=skip)", self.global_step)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1

    def check_finite(self, values: dict[str, torch.Tensor], stop: bool = True) -> bool:
        """Raises NonFiniteLossError on a NaN/Inf value; with stop=False returns whether there was one."""
        bad = {k: float(v.detach()) for k, v in values.items() if not torch.isfinite(v).all()}
        if bad and not stop:
            return True
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}): {bad}. Training stopped "
                f"before the optimizer step; the checkpoints on disk hold the last good weights."
            )
        return False

    # -- optimisation -------------------------------------------------------------------------------
    def effective_batch_size(self) -> int:
        dm = self.trainer.datamodule
        bs = getattr(dm, "batch_size", 1) if dm is not None else 1
        return bs * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def base_lr(self) -> float:
        o = self.optim
        return o.lr if o.lr is not None else o.blr * self.effective_batch_size() / 256

    def param_groups(self, lr: float) -> list[dict]:
        o = self.optim
        skip = set(getattr(self.model, "no_weight_decay", lambda: set())())
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if o.no_decay_1d and (p.ndim <= 1 or name.endswith(".bias") or name in skip):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups += [{"params": list(self.objective.parameters()), "weight_decay": o.weight_decay}]
        if self.probe is not None:
            groups.append({"params": list(self.probe.parameters()), "weight_decay": 0.0, "lr": self.probe_lr})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        o = self.optim
        lr = self.base_lr()
        groups = self.param_groups(lr)
        fused = o.fused if o.fused is not None else (self.device.type == "cuda" or None)
        if o.optimizer in ("adamw", "adam"):
            cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
            opt = cls(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
        total = int(self.trainer.estimated_stepping_batches)  # the steps the run will take (max_steps too)
        warmup = warmup_steps(o, self.trainer)
        fn = lambda step: warmup_cosine(step, warmup, total, lr, o.min_lr, o.schedule == "cosine")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- exact resume: RNG states travel with the checkpoint ----------------------------------------
    def _restore_loader_position(self) -> None:
        """configure_optimizers asks for estimated_stepping_batches, which builds the train loader before
        Lightning restores the loops, so Lightning never hands it the saved loader position: done here. Not
        through Lightning's `_load_combined_loader_states`, which skips a checkpoint written at an epoch's end
        (the loop is then not "restarting"): the loader would restart at epoch 0's order, and a resumed run
        would see other batches than an uninterrupted one (measured: 1.6e-3 max abs weight difference)."""
        loop = self.trainer.fit_loop
        states, loop._combined_loader_states_to_load = loop._combined_loader_states_to_load, []
        if not states or loop._combined_loader is None:
            return
        loop._combined_loader._load_state_dicts(states)
        if loop.epoch_loop.batch_progress.is_last_batch:
            # the saved epoch is over, also when the trainer cut it short (limit_train_batches) and the loader
            # itself would continue it: the next iteration starts the next epoch
            for loader in loop._combined_loader.flattened:
                getattr(loader, "end_epoch", lambda: None)()

    def on_save_checkpoint(self, checkpoint):
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(f"refusing to save a checkpoint: parameter {name} holds NaN/Inf")
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_safe(np.random.get_state()),
            "python": random.getstate(),
        }
        checkpoint["nonfinite_skipped"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint):
        self._rng_to_restore = checkpoint.get("rng")
        self.skipped_steps = int(checkpoint.get("nonfinite_skipped", 0))

    def on_train_start(self):
        self._restore_loader_position()
        # restored here, after the sanity check, so that the resumed run draws the same numbers
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])
