"""Fine-tuning with MAE/BEiT layer-wise lr decay (`module=layer_decay`), and the identity-adversarial extras
of FMAE-IAT (aeforge/models/fmae_iat.py): an lr multiplier and extra update steps for the identity head."""

from __future__ import annotations

import torch

from aeforge.modules.base import AEModule
from aeforge.modules.optim import layer_decay_groups


class LayerDecayModule(AEModule):
    """AEModule with MAE's fine-tuning param groups: lr scale layer_decay ** (num_layers - layer_id) with
    num_layers = depth + 1 (the model provides `layer_id(name)` and `depth`); no decay on 1-D params.

    Two knobs for a stronger adversary in the GRL min-max, both aeforge additions (not in the FMAE-IAT paper
    or code; their defaults are the paper):
    - id_head_lr_mult: the identity head's parameters (`id_head.*`) get their own param groups with lr (and
      lr_scale) times this factor. The warmup/cosine schedule scales every group alike.
    - id_head_steps: identity-head updates per backbone update (as a GAN's critic steps). Before each
      training step the head takes id_head_steps - 1 extra steps, alone, on the previous batch's detached
      features, with the run's optimizer (so its lr, schedule and Adam state); the reversed gradient the
      backbone then gets comes from a head that is closer to the best identity classifier of the current
      features. id_loss_term names the objective term that is the identity loss, features_key the model output
      the head reads.
    confusion_loss_term names the objective term on the confusion adversary's output (model.adversary=confusion):
    without it the backbone would get no adversarial gradient, so its absence is an error."""

    def __init__(self, layer_decay: float = 0.75, id_head_lr_mult: float = 1.0, id_head_steps: int = 1,
                 id_loss_term: str = "identity", confusion_loss_term: str = "confusion", features_key: str = "features",
                 **kwargs):
        super().__init__(**kwargs)
        terms = sorted(self.objective.terms)
        if id_head_lr_mult <= 0:
            raise ValueError(f"module.id_head_lr_mult must be > 0, got {id_head_lr_mult}")
        if id_head_steps < 1:
            raise ValueError(f"module.id_head_steps must be >= 1 (1 = the paper), got {id_head_steps}")
        if id_head_steps > 1:
            if getattr(self.model, "id_head", None) is None:
                raise ValueError("module.id_head_steps > 1 needs an identity head (model.num_identities > 0)")
            if id_loss_term not in terms:
                raise ValueError(f"module.id_loss_term={id_loss_term!r} is not an objective term; valid: {terms}")
        confusion = getattr(self.model, "adversary", "grl") == "confusion" and self.model.id_head is not None
        if confusion and confusion_loss_term not in terms:
            raise ValueError(f"model.adversary=confusion needs a loss on id_confusion_logits, or the backbone gets no "
                             f"adversarial gradient at all: add objective=fmae_iat_confusion (objective term "
                             f"module.confusion_loss_term={confusion_loss_term!r} not among {terms})")
        self.layer_decay, self.id_head_lr_mult = layer_decay, float(id_head_lr_mult)
        self.id_head_steps, self.id_loss_term = int(id_head_steps), id_loss_term
        self.features_key = features_key
        self._adversary_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def param_groups(self, lr: float) -> list[dict]:
        model = self.model
        if not hasattr(model, "layer_id"):
            return super().param_groups(lr)
        o = self.optim
        skip = set(getattr(model, "no_weight_decay", lambda: set())())
        out = layer_decay_groups(model, lr, o.weight_decay, self.layer_decay, lambda name, p: o.no_decay_1d and (
            p.ndim <= 1 or name.endswith(".bias") or name in skip))
        if self.id_head_lr_mult != 1.0:
            out = _split_id_head_groups(out, self.id_head_lr_mult)
        if self.probe is not None:
            out.append({"params": list(self.probe.parameters()), "weight_decay": 0.0, "lr": self.probe_lr})
        return out

    # -- extra identity-head steps --------------------------------------------------------------------
    def on_fit_start(self):
        if self.id_head_steps > 1 and self.trainer.accumulate_grad_batches > 1:
            raise ValueError("module.id_head_steps > 1 cannot be combined with trainer.accumulate_grad_batches > 1 "
                             "(the extra head steps would step on the accumulated gradients)")

    def _step(self, batch) -> dict[str, torch.Tensor]:
        batch = self.with_progress(batch)
        out = self.model(batch)
        if self.training and self.id_head_steps > 1:
            target = batch[self.objective.terms[self.id_loss_term].target_key]
            self._adversary_batch = (out[self.features_key].detach(), target.detach())
        return self._losses(out, batch)

    def training_step(self, batch, batch_idx):
        if self._adversary_batch is not None:
            features, target = (t.to(self.device) for t in self._adversary_batch)
            self.train_identity_head(features, target, steps=self.id_head_steps - 1)
        return super().training_step(batch, batch_idx)

    def train_identity_head(self, features: torch.Tensor, target: torch.Tensor, steps: int) -> None:
        """`steps` updates of the identity head alone on fixed features. Gradients come from autograd.grad
        (nothing accumulates into the backbone or reaches DDP's hooks) and are averaged over ranks by hand;
        the optimizer skips every parameter without a gradient."""
        term = self.objective.terms[self.id_loss_term]
        params = [p for p in self.model.id_head.parameters() if p.requires_grad]
        opt = self.optimizers().optimizer
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        opt.zero_grad(set_to_none=True)  # the previous step's gradients, already applied
        for _ in range(steps):
            loss = term({term.pred_key: self.model.id_head(features)}, {term.target_key: target})
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                if distributed:
                    torch.distributed.all_reduce(g)
                    g /= torch.distributed.get_world_size()
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        if self._adversary_batch is not None:  # the next step's extra head updates use it: exact resume
            checkpoint["iat_adversary_batch"] = [t.cpu() for t in self._adversary_batch]

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("iat_adversary_batch")
        self._adversary_batch = tuple(saved) if saved else None


def _split_id_head_groups(groups: list[dict], mult: float, prefix: str = "id_head.") -> list[dict]:
    """Move the parameters named prefix* of each group into a copy of that group with lr and lr_scale * mult."""
    out = []
    for g in groups:
        names = g.get("names", [])
        idx = [i for i, n in enumerate(names) if n.startswith(prefix)]
        if not idx:
            out.append(g)
            continue
        rest = [i for i in range(len(names)) if i not in set(idx)]
        for keep, m in ((rest, 1.0), (idx, mult)):
            if keep:
                sub = {**g, "params": [g["params"][i] for i in keep], "names": [names[i] for i in keep]}
                sub["lr"], sub["lr_scale"] = g["lr"] * m, g.get("lr_scale", 1.0) * m
                out.append(sub)
    return out
