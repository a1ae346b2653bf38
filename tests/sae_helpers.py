"""Callbacks the SAE distributed tests inject into train.py runs (`+callbacks.<name>._target_=...`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


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
                "resamples_done": getattr(pl_module, "resamples_done", 0)}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(info))
