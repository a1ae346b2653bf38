"""The `optim` group (`OptimSettings`) and the learning-rate pieces every module shares: warmup + cosine, and
the layer-wise lr decay of MAE/BEiT fine-tuning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class OptimSettings:
    """The `optim` group (typed: a misspelt key or a wrong type fails before any compute)."""

    optimizer: str = "adamw"
    lr: float | None = 1e-3
    blr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    momentum: float = 0.9
    no_decay_1d: bool = True
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr: float = 0.0
    fused: bool | None = None

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optim.optimizer={self.optimizer!r}; valid: ['adam', 'adamw', 'sgd']")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}; valid: ['constant', 'cosine']")
        if (self.lr is None) == (self.blr is None):
            raise ValueError("set exactly one of optim.lr (absolute) and optim.blr (lr = blr * batch / 256)")


def warmup_cosine(step: int, warmup: int, total: int, base_lr: float, min_lr: float, cosine: bool) -> float:
    """Multiplier of the base lr at `step`: linear warmup from 0, then half-cycle cosine to min_lr."""
    if step < warmup:
        return step / warmup
    if not cosine or total <= warmup:
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    floor = min_lr / base_lr if base_lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(settings: OptimSettings, trainer) -> int:
    """Warmup length in optimiser steps: `warmup_steps`, else `warmup_epochs` x the steps of one epoch of the
    train loader. An epoch's length comes from the loader, never from total / max_epochs: when max_steps
    ends the run (max_epochs=-1, or fewer steps than the epochs hold) that ratio is not an epoch, and with
    max_epochs=-1 the lr never left warmup."""
    if settings.warmup_steps is not None:
        return settings.warmup_steps
    if not settings.warmup_epochs:
        return 0
    if trainer.train_dataloader is None:  # estimated_stepping_batches skips the loader when max_epochs=-1
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if batches == float("inf"):
        raise ValueError("optim.warmup_epochs needs a train loader with a length; set optim.warmup_steps instead")
    return int(settings.warmup_epochs * math.ceil(batches / trainer.accumulate_grad_batches))


def layer_decay_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       no_decay) -> list[dict]:
    """MAE/BEiT fine-tuning param groups: lr scale layer_decay ** (depth + 1 - layer_id), where the model
    provides `depth` and `layer_id(name)` (embeddings 0, block k -> k + 1, the rest depth + 1); no weight
    decay where `no_decay(name, param)` is true. Groups carry their `names`, `layer_id` and `lr_scale`."""
    num_layers = model.depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip, lid = bool(no_decay(name, p)), model.layer_id(name)
        if (lid, skip) not in groups:
            scale = layer_decay ** (num_layers - lid)
            groups[(lid, skip)] = {"params": [], "names": [], "layer_id": lid, "lr_scale": scale, "lr": lr * scale,
                                   "weight_decay": 0.0 if skip else weight_decay}
        groups[(lid, skip)]["params"].append(p)
        groups[(lid, skip)]["names"].append(name)
    return [groups[k] for k in sorted(groups)]
