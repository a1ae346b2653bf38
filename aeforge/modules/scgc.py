"""SCGC's training loop (`module=scgc`): DEC self-training with per-epoch clustering metrics.

- each epoch: P from a detached Q of every node ("update interval 1"). In full-batch mode the Q of the
  training forward *is* that Q (same weights, no step in between), so P and the metrics come from it at no
  extra forward pass; in mini-batch mode a chunked no-grad pass over all nodes runs at the epoch start. P
  reaches the objective as `batch["p"]` (a new dict: the DataModule's batch is not changed);
- metrics of the state after e = 0..E epochs (e = 0: the pretrain stage's AE + k-means) go to the loggers
  as cluster/{acc,nmi,ari,f1}; at the end the run's metrics get `acc, nmi, ari, f1` (final state), `best_*`
  (each metric's maximum over e, independently: the original's oracle protocol), `best_epoch_acc` and
  `init_*` (AE + k-means). History: clustering_history.json.

The start itself (AE pre-training, k-means) is the `scgc_pretrain` stage (aeforge/stages/scgc.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from aeforge.eval.clustering import clustering_metrics
from aeforge.models.scgc import target_distribution
from aeforge.modules.base import AEModule

log = logging.getLogger("aeforge")

METRICS = ("acc", "nmi", "ari", "f1")


class SCGCModule(AEModule):
    def __init__(self, *args, log_every: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_every = log_every
        self.history: list[dict] = []
        self._observed_epoch = -1
        # mini-batch mode: P of every node for the current epoch, indexed by node id (never checkpointed)
        self._epoch_p: torch.Tensor | None = None

    def on_fit_start(self) -> None:
        self._num_nodes = self.trainer.datamodule.num_nodes
        if not bool(self.model.initialised):  # restored from the checkpoint on resume
            log.warning("SCGC starts from a random encoder and random centres: no stage set them "
                        "(stages=scgc_pretrain does AE pre-training + k-means)")

    # -- metrics --------------------------------------------------------------------------------------
    def _observe(self, epoch: int, pred: torch.Tensor) -> None:
        if epoch == self._observed_epoch or not self.trainer.is_global_zero:
            return
        self._observed_epoch = epoch
        m = clustering_metrics(self.trainer.datamodule.labels, pred)
        self.history.append({"epoch": epoch, "step": int(self.global_step), **m})
        for lg in self.loggers:
            row = {f"cluster/{k}": v for k, v in m.items()} | {"epoch": epoch}
            lg.log_metrics(row, step=self.global_step)
        if epoch % self.log_every == 0:
            log.info("epoch %3d  " + "  ".join(f"{k} {m[k]:.4f}" for k in METRICS), epoch)

    def _step(self, batch) -> dict[str, torch.Tensor]:
        batch = self.with_progress(batch)
        out = self.model(batch)
        if self._epoch_p is not None:
            p = self._epoch_p[batch["idx"]]
        else:  # full batch: this forward's Q is the epoch-start Q
            q = out["q"].detach()
            p = target_distribution(q)
            if self.training and len(q) == self._num_nodes:
                self._observe(self.current_epoch, q.argmax(1))
        return self.objective(out, {**batch, "p": p})

    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm.full_batch_mode:
            self._epoch_p = None
            return
        q = self.model.predict_all(dm.features.to(self.device))
        self._epoch_p = target_distribution(q)
        self._observe(self.current_epoch, q.argmax(1))

    def on_train_end(self) -> None:
        self._epoch_p = None
        # the state after the last epoch (the epoch-start observations stop one step short of it)
        self._observed_epoch = -1
        q = self.model.predict_all(self.trainer.datamodule.features.to(self.device))
        self._observe(self.history[-1]["epoch"] + 1 if self.history else 0, q.argmax(1))
        if not self.trainer.is_global_zero or not self.history:
            return
        final, first = self.history[-1], self.history[0]
        summary = {k: final[k] for k in METRICS}
        summary |= {f"best_{k}": max(h[k] for h in self.history) for k in METRICS}
        summary |= {f"init_{k}": first[k] for k in METRICS}
        summary["best_epoch_acc"] = max(self.history, key=lambda h: h["acc"])["epoch"]
        # picked up by train.run() with the other callback metrics and written to metrics.json
        self.trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in summary.items()})
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "clustering_history.json").write_text(json.dumps({"summary": summary, "epochs": self.history}))

    # -- resume ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["scgc"] = {"history": self.history}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.history = checkpoint.get("scgc", {}).get("history", [])
        if self.history:
            self._observed_epoch = self.history[-1]["epoch"]
