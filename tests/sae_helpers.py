"""Callbacks the SAE tests inject into train.py runs (`+callbacks.<name>._target_=...`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn


class SiteProbe(pl.Callback):
    """Writes, per rank, which sites its SAEBank holds, its parameter names and whether each held site's
    weights changed during fit and its dead-latent counters, to <out_dir>/probe_rank<r>.json."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        bank = pl_module.model
        params = dict(bank.named_parameters())
        changed = {
            s: any(not torch.equal(params[n], self.start[n]) for n in params if n.startswith(f"saes.{s}."))
            for s, _ in bank.local_sites()
        }
        info = {"rank": trainer.global_rank, "sites": [s for s, _ in bank.local_sites()],
                "params": sorted(params), "changed": changed,
                "tokens_since_fired": {s: sae.tokens_since_fired.tolist() for s, sae in bank.local_sites()},
                "param_sums": {n: [float(p.double().sum()), float(p.double().abs().sum())] for n, p in params.items()},
                "resamples_done": pl_module.resamples_done}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(info))


def plain_attributes(**roots: nn.Module) -> dict[str, str]:
    """repr of every attribute of every module under `roots` except parameters, buffers, submodules (torch
    keeps those in underscored dicts) and the train/eval flag: the state nothing outside should write."""
    return {
        f"{root}.{name}.{k}": repr(v)
        for root, module in roots.items()
        for name, m in module.named_modules()
        for k, v in vars(m).items()
        if not k.startswith("_") and k != "training"
    }


class AttributeProbe(pl.Callback):
    """Writes <out_dir>/attributes.json: the model's and the objective's plain attributes when fit sets up
    (before the LightningModule's own setup) and when it ends."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.before: dict[str, str] = {}

    def setup(self, trainer, pl_module, stage):
        self.before = plain_attributes(model=pl_module.model, objective=pl_module.objective)

    def on_fit_end(self, trainer, pl_module):
        after = plain_attributes(model=pl_module.model, objective=pl_module.objective)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "attributes.json").write_text(json.dumps({"before": self.before, "after": after}))
