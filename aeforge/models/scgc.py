"""SCGC / SCGC* (Kulatilleke et al. 2022): an MLP autoencoder whose embedding is clustered by DEC-style
self-training, while the graph enters only through the neighbour-contrastive loss (objectives/clustering).

- encoder d-500-500-2000-10 and mirror decoder, as SDCN's AE (ReLU between layers, none on z or x̂);
- cluster centres μ (K × n_z), Student-t soft assignment q (v = 1), DEC target distribution p;
- SCGC* (`decoder: false`) keeps encoder + μ only, half the parameters. Its encoder still comes from
  a *full* AE pre-training (the original loads the encoder keys of SDCN's AE checkpoint).

Two-stage start (`initialise`): AE pre-training with MSE (Adam, lr 1e-3, batch 256, 30 epochs: SDCN's
recipe), cached on disk by a key of everything that determines its weights, then k-means (n_init 20) on
z to set μ. A checkpointed model carries `initialised = 1` so a resumed run skips both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aeforge.eval.clustering import clustering_metrics
from aeforge.models.base import AutoencoderModel
from aeforge.modules.base import AEModule
from aeforge.nn.mlp import mlp

log = logging.getLogger("aeforge")


def student_t(z: torch.Tensor, centres: torch.Tensor, v: float = 1.0) -> torch.Tensor:
    """q_ij ∝ (1 + ||z_i - μ_j||² / v)^(-(v+1)/2), rows normalised (DEC)."""
    d2 = torch.cdist(z, centres).pow(2) if z.shape[0] > 4096 else (z[:, None] - centres[None]).pow(2).sum(-1)
    q = (1.0 + d2 / v).pow(-(v + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """p_ij = (q_ij² / f_j) / Σ_j' (q_ij'² / f_j'), f_j = Σ_i q_ij: sharpened and frequency-balanced."""
    w = q.pow(2) / q.sum(0)
    return w / w.sum(1, keepdim=True)


class SCGC(AutoencoderModel):
    modality = "graph"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden_dims: list[int] = (500, 500, 2000),
        latent_dim: int = 10,
        decoder: bool = True,
        n_clusters: int | None = None,
        student_v: float = 1.0,
        pretrain_epochs: int = 30,
        pretrain_lr: float = 1e-3,
        pretrain_batch_size: int = 256,
        pretrain_seed: int | None = 0,
        pretrain_max_steps: int = -1,
        cache_dir: str | None = None,
        kmeans_n_init: int = 20,
        kmeans_seed: int | None = None,
    ):
        """decoder: false gives SCGC* (trimmed). n_clusters: null = the data's number of classes.
        pretrain_seed: one pre-trained AE shared by every run seed (as the paper reused SDCN's single
        checkpoint); null = the k-means/run seed. pretrain_max_steps: cap on pre-training steps
        (-1: none; smoke runs tie it to trainer.max_steps). cache_dir: null = no cache.
        kmeans_seed: null = the run seed (pl.seed_everything's)."""
        super().__init__()
        self.input_dim = int(np.prod(input_shape))
        self.hidden_dims, self.latent_dim = list(hidden_dims), latent_dim
        self.encoder = mlp([self.input_dim, *self.hidden_dims, latent_dim], "relu")
        dec_dims = [latent_dim, *reversed(self.hidden_dims), self.input_dim]
        self.decoder = mlp(dec_dims, "relu") if decoder else None
        self.student_v = student_v
        self.pretrain_cfg = {
            "epochs": pretrain_epochs, "lr": pretrain_lr, "batch_size": pretrain_batch_size,
            "seed": pretrain_seed, "max_steps": pretrain_max_steps,
        }
        self.cache_dir = cache_dir
        self.kmeans_n_init, self.kmeans_seed = kmeans_n_init, kmeans_seed
        self.centres: nn.Parameter | None = None
        self.register_buffer("initialised", torch.zeros((), dtype=torch.uint8))
        if n_clusters:
            self.build_centres(n_clusters)
        # P for the current epoch, indexed by node id; set by the module, never checkpointed
        self.target_p: torch.Tensor | None = None

    def build_centres(self, n_clusters: int) -> None:
        if self.centres is None:
            self.centres = nn.Parameter(torch.empty(n_clusters, self.latent_dim))
            nn.init.xavier_normal_(self.centres)

    # -- contract -----------------------------------------------------------------------------------
    def encode(self, batch) -> torch.Tensor:
        return self.encoder(batch["x"])

    def soft_assignment(self, z: torch.Tensor) -> torch.Tensor:
        return student_t(z, self.centres, self.student_v)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        z = self.encode(batch)
        out = {"z": z, "q": self.soft_assignment(z)}
        if self.decoder is not None:
            out["recon"] = self.decoder(z)
        if self.target_p is not None and "idx" in batch:
            out["p"] = self.target_p[batch["idx"]]
        return out

    def reconstruct(self, batch) -> torch.Tensor:
        if self.decoder is None:
            raise AttributeError("SCGC* has no decoder")
        return self.decoder(self.encode(batch))

    @torch.no_grad()
    def predict_all(self, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Q for every node (chunked, so 10^5-10^6 nodes fit)."""
        parts = [self.soft_assignment(self.encoder(x[s : s + chunk])) for s in range(0, len(x), chunk)]
        return torch.cat(parts)

    # -- two-stage start ----------------------------------------------------------------------------
    def cache_key(self, x: torch.Tensor, seed: int) -> str:
        """Everything that determines the pre-trained weights: data content, architecture, recipe and the
        seed actually used (with pretrain_seed=null each run seed has its own AE)."""
        h = hashlib.sha256()
        h.update(x.detach().cpu().numpy().tobytes())
        spec = {"dims": [self.input_dim, *self.hidden_dims, self.latent_dim], **self.pretrain_cfg, "seed": seed}
        h.update(json.dumps(spec, sort_keys=True).encode())
        return h.hexdigest()[:20]

    def pretrain(self, x: torch.Tensor, seed: int) -> dict[str, float]:
        """SDCN's AE pre-training: MSE(x̂, x), Adam, shuffled mini-batches. SCGC* pre-trains a full AE
        too (a throw-away decoder) and keeps the encoder, as the original did with SDCN's checkpoint."""
        cfg = self.pretrain_cfg
        pseed = cfg["seed"] if cfg["seed"] is not None else seed
        path = None
        if self.cache_dir:
            path = Path(self.cache_dir) / f"ae_{self.cache_key(x, pseed)}.pt"
            if path.is_file():
                state = torch.load(path, map_location=x.device, weights_only=True)
                self.encoder.load_state_dict(state["encoder"])
                if self.decoder is not None:
                    self.decoder.load_state_dict(state["decoder"])
                log.info("SCGC: pre-trained AE loaded from %s", path)
                mse = state.get("mse", float("nan"))
                return {"pretrain_cached": 1.0, "pretrain_seconds": 0.0, "pretrain_mse": mse}
        t0 = time.time()
        dev_rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
        with dev_rng:  # the pre-training draws must not shift the run's own random stream
            torch.manual_seed(pseed)
            # fresh initialisation for the cache key's seed, so cached and recomputed weights agree
            encoder = mlp([self.input_dim, *self.hidden_dims, self.latent_dim], "relu").to(x.device)
            decoder = mlp([self.latent_dim, *reversed(self.hidden_dims), self.input_dim], "relu").to(x.device)
            params = [*encoder.parameters(), *decoder.parameters()]
            opt = torch.optim.Adam(params, lr=cfg["lr"])
            g = torch.Generator(device="cpu").manual_seed(pseed)
            steps, mse = 0, float("nan")
            for _ in range(cfg["epochs"]):
                perm = torch.randperm(len(x), generator=g).to(x.device)
                total, count = 0.0, 0
                for s in range(0, len(x), cfg["batch_size"]):
                    xb = x[perm[s : s + cfg["batch_size"]]]
                    loss = F.mse_loss(decoder(encoder(xb)), xb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, count = total + loss.item() * len(xb), count + len(xb)
                    steps += 1
                    if 0 <= cfg["max_steps"] <= steps:
                        break
                mse = total / max(count, 1)
                if 0 <= cfg["max_steps"] <= steps:
                    break
        self.encoder.load_state_dict(encoder.state_dict())
        if self.decoder is not None:
            self.decoder.load_state_dict(decoder.state_dict())
        seconds = time.time() - t0
        log.info("SCGC: AE pre-trained in %.1fs (%d steps, mse %.5f)", seconds, steps, mse)
        if 0 <= cfg["max_steps"] <= steps:
            # the cap follows trainer.max_steps by default (so smoke runs stay short): say so loudly, a
            # user who capped SCGC's steps may not expect the AE to be cut short too
            log.warning("SCGC: AE pre-training stopped at model.pretrain_max_steps=%d (trainer.max_steps by "
                        "default), before its %d epochs; set model.pretrain_max_steps=-1 for the full recipe",
                        cfg["max_steps"], cfg["epochs"])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "mse": mse}, tmp)
            os.replace(tmp, path)  # atomic: concurrent sweep jobs never read a half-written file
        return {"pretrain_cached": 0.0, "pretrain_seconds": seconds, "pretrain_mse": mse}

    @torch.no_grad()
    def init_centres(self, x: torch.Tensor, seed: int) -> np.ndarray:
        """μ ← k-means centres of z (n_init restarts, seeded: the original left k-means unseeded)."""
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        z = torch.cat([self.encoder(x[s : s + 65536]) for s in range(0, len(x), 65536)]).cpu().numpy()
        # one thread: after torch has run, sklearn's OpenMP pool contends with torch's and k-means on
        # 3k x 10 points took 14 s instead of 0.2 s on 2 cores (measured)
        with threadpool_limits(1):
            km = KMeans(n_clusters=self.centres.shape[0], n_init=self.kmeans_n_init, random_state=seed).fit(z)
        self.centres.data.copy_(torch.from_numpy(km.cluster_centers_).to(self.centres))
        return km.labels_

    def initialise(self, x: torch.Tensor, seed: int) -> dict[str, float]:
        info = self.pretrain(x, seed)
        self.init_centres(x, self.kmeans_seed if self.kmeans_seed is not None else seed)
        self.initialised.fill_(1)
        return info


# -- training loop ------------------------------------------------------------------------------------

METRICS = ("acc", "nmi", "ari", "f1")


class SCGCModule(AEModule):
    """AEModule with SCGC's two-stage start and per-epoch clustering metrics.

    - fit start: AE pre-training (cached) + k-means init of μ, unless resumed from a checkpoint;
    - each epoch: P from a detached Q of every node ("update interval 1"). In full-batch mode the Q of
      the training forward *is* that Q (same weights, no step in between), so P and the metrics come
      from it at no extra forward pass; in mini-batch mode a chunked no-grad pass over all nodes runs
      at the epoch start;
    - metrics of the state after e = 0..E epochs (e = 0: AE + k-means) go to the loggers as
      cluster/{acc,nmi,ari,f1}; at the end the run's metrics get `acc, nmi, ari, f1` (final state),
      `best_*` (each metric's maximum over e, independently: the original's oracle protocol),
      `best_epoch_acc`, `init_*` (AE + k-means) and the pre-training time. History: clustering_history.json.
    """

    def __init__(self, *args, log_every: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.centres is None:
            if not kwargs.get("num_classes"):
                raise ValueError("SCGC needs model.n_clusters or labelled data to size the cluster layer")
            self.model.build_centres(int(kwargs["num_classes"]))
        self.log_every = log_every
        self.history: list[dict] = []
        self.init_info: dict[str, float] = {}
        self._observed_epoch = -1

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(self.objective, "order"):
            # Γ's structure is an objective knob (sweeps set objective.order); the data builds Γ
            dm.order, dm.cumulative = int(self.objective.order), bool(self.objective.cumulative)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        self._num_nodes = dm.num_nodes
        if not bool(self.model.initialised):
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            self.init_info = self.model.initialise(dm.features.to(self.device), seed)

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
        out = self.model(batch)
        if "p" not in out:  # full batch: this forward's Q is the epoch-start Q
            q = out["q"].detach()
            out["p"] = target_distribution(q)
            if self.training and len(q) == self._num_nodes:
                self._observe(self.current_epoch, q.argmax(1))
        return self.objective(out, batch)

    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm.full_batch_mode:
            self.model.target_p = None
            return
        q = self.model.predict_all(dm.features.to(self.device))
        self.model.target_p = target_distribution(q)
        self._observe(self.current_epoch, q.argmax(1))

    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        self.model.target_p = None
        # the state after the last epoch (the epoch-start observations stop one step short of it)
        self._observed_epoch = -1
        q = self.model.predict_all(dm.features.to(self.device))
        self._observe(self.history[-1]["epoch"] + 1 if self.history else 0, q.argmax(1))
        if not self.trainer.is_global_zero or not self.history:
            return
        final, first = self.history[-1], self.history[0]
        summary = {k: final[k] for k in METRICS}
        summary |= {f"best_{k}": max(h[k] for h in self.history) for k in METRICS}
        summary |= {f"init_{k}": first[k] for k in METRICS}
        summary["best_epoch_acc"] = max(self.history, key=lambda h: h["acc"])["epoch"]
        summary |= self.init_info
        # picked up by train.run() with the other callback metrics and written to metrics.json
        self.trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in summary.items()})
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "clustering_history.json").write_text(json.dumps({"summary": summary, "epochs": self.history}))

    # -- resume ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["scgc"] = {"history": self.history, "init_info": self.init_info}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("scgc", {})
        self.history, self.init_info = state.get("history", []), state.get("init_info", {})
        if self.history:
            self._observed_epoch = self.history[-1]["epoch"]
