"""SCGC's two-stage start, run once before the first epoch (`stages=scgc_pretrain`): SDCN's AE pre-training
(MSE, Adam, lr 1e-3, batch 256, 30 epochs), cached on disk by a key of everything that determines its weights,
then k-means (n_init 20) on z to set the cluster centres μ. A resumed run skips it: the checkpoint holds the
weights and μ it produced.

`restarts: N` pre-trains N AEs (seeds seed, seed+1, …, each cached) and keeps the one an unsupervised
criterion prefers (`select`): the AE's reconstruction MSE (default: the one that ranked AEs by final ACC in
docs/methods/scgc.md, "Restarts"), its k-means silhouette on z, or the k-means inertia as a fraction of z's
total variance (scale-free, so AEs with differently scaled z compare). Labels are never read here.

SCGC* pre-trains a full AE too (a throw-away decoder) and keeps the encoder, as the original loaded the
encoder keys of SDCN's AE checkpoint.
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

from aeforge.eval.clustering import fit_kmeans
from aeforge.models.scgc import SCGC, encode_all, encoder_decoder
from aeforge.stages import StageContext

NAME = "scgc_pretrain"
# criterion -> +1 when larger is better, -1 when smaller is
SELECT = {"silhouette": 1, "inertia": -1, "mse": -1}


def cache_key(x: torch.Tensor, spec: dict) -> str:
    """Everything that determines the pre-trained weights: data content and `spec` (dims, recipe and the seed
    actually used: with seed=null each run seed has its own AE). The spec keeps the keys of the pre-training
    that lived in the model before this stage, so AEs cached then are still found."""
    h = hashlib.sha256()
    h.update(x.detach().cpu().numpy().tobytes())
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:20]


class SCGCPretrain:
    def __init__(
        self,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 256,
        seed: int | None = 0,
        max_steps: int = -1,
        cache_dir: str | None = None,
        kmeans_n_init: int = 20,
        kmeans_seed: int | None = None,
        restarts: int = 1,
        select: str = "mse",
    ):
        """seed: the AE's, shared by every run seed (the paper reused SDCN's single checkpoint); null = the
        run seed. max_steps: cap on pre-training steps (-1: none). cache_dir: null = no cache.
        kmeans_seed: null = the run seed. restarts: AEs pre-trained (seeds seed..seed+restarts-1), the one
        `select` prefers is kept (mse | silhouette | inertia)."""
        if select not in SELECT:
            raise ValueError(f"stages.{NAME}.select={select!r}: choose one of {sorted(SELECT)}")
        if restarts < 1:
            raise ValueError(f"stages.{NAME}.restarts must be >= 1, got {restarts}")
        self.recipe = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_steps": max_steps}
        self.seed, self.cache_dir = seed, cache_dir
        self.kmeans_n_init, self.kmeans_seed = kmeans_n_init, kmeans_seed
        self.restarts, self.select = restarts, select

    def __call__(self, model: SCGC, datamodule, ctx: StageContext) -> dict[str, float]:
        log = ctx.logger(NAME)
        x = datamodule.features.to(ctx.device)
        seed = self.seed if self.seed is not None else ctx.seed
        kseed = self.kmeans_seed if self.kmeans_seed is not None else ctx.seed
        best, info = None, {"pretrain_seconds": 0.0, "pretrain_cached": 1.0}
        for r in range(self.restarts):
            start = self.candidate(model, x, seed + r, kseed, log)
            info["pretrain_seconds"] += start["info"]["pretrain_seconds"]
            info["pretrain_cached"] = min(info["pretrain_cached"], start["info"]["pretrain_cached"])
            if self.restarts > 1:
                info |= {f"restart{r}/{k}": v for k, v in start["criteria"].items()}
                log.info("restart %d (AE seed %d): %s", r, seed + r,
                         "  ".join(f"{k} {v:.4f}" for k, v in start["criteria"].items()))
            score = SELECT[self.select] * start["criteria"][self.select] if self.restarts > 1 else 0.0
            if best is None or score > best[0]:
                best = (score, r, start)
        _, chosen, start = best
        info |= {"pretrain_mse": start["criteria"]["mse"], "pretrain_restart": float(chosen)}
        model.start_from(torch.from_numpy(start["centres"]), start["encoder"], start["decoder"])
        if self.restarts > 1:
            log.info("kept restart %d (AE seed %d) by %s", chosen, seed + chosen, self.select)
        log.info("μ from k-means on z (%d clusters, n_init %d, seed %d)", len(start["centres"]),
                 self.kmeans_n_init, kseed)
        return info

    def candidate(self, model: SCGC, x: torch.Tensor, seed: int, kseed: int, log: logging.Logger) -> dict:
        """One start: the AE of `seed` (cached or trained), k-means on its z, and the selection criteria."""
        # the pre-training draws must not shift the run's own random stream
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)  # a fresh initialisation for the cache key's seed: cached == recomputed
            encoder, decoder = (m.to(x.device) for m in encoder_decoder(model.dims))
            info = self.autoencoder(encoder, decoder, x, {"dims": model.dims, **self.recipe, "seed": seed}, log)
            z = encode_all(encoder, x).cpu().numpy()
        km = fit_kmeans(z, model.centres.shape[0], self.kmeans_n_init, kseed)  # seeded: the original was not
        criteria = {"mse": info["pretrain_mse"]}
        if self.restarts > 1:
            criteria |= start_criteria(z, km, seed=kseed)
        return {"info": info, "criteria": criteria, "centres": km.cluster_centers_,
                "encoder": encoder.state_dict(), "decoder": decoder.state_dict()}

    def autoencoder(self, encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, spec: dict,
                    log: logging.Logger) -> dict[str, float]:
        """The AE weights into `encoder`/`decoder` (freshly initialised): from the cache if `spec` (dims,
        recipe, seed) was trained before, else trained here and cached."""
        path = None
        if self.cache_dir:
            path = Path(self.cache_dir) / f"ae_{cache_key(x, spec)}.pt"
            if path.is_file():
                state = torch.load(path, map_location=x.device, weights_only=True)
                encoder.load_state_dict(state["encoder"])
                decoder.load_state_dict(state["decoder"])
                log.info("pre-trained AE loaded from %s", path)
                return {"pretrain_cached": 1.0, "pretrain_seconds": 0.0, "pretrain_mse": state.get("mse", float("nan"))}
        t0 = time.time()
        steps, mse = self.train(encoder, decoder, x, spec["seed"])
        seconds = time.time() - t0
        log.info("AE pre-trained in %.1fs (%d steps, mse %.5f)", seconds, steps, mse)
        cap, epochs = self.recipe["max_steps"], self.recipe["epochs"]
        if 0 <= cap <= steps:
            # the cap follows trainer.max_steps by default (so smoke runs stay short): say so loudly, a user
            # who capped SCGC's steps may not expect the AE to be cut short too
            log.warning("AE pre-training stopped at stages.%s.max_steps=%d (trainer.max_steps by default), before "
                        "its %d epochs; set stages.%s.max_steps=-1 for the full recipe", NAME, cap, epochs, NAME)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "mse": mse}, tmp)
            os.replace(tmp, path)  # atomic: concurrent sweep jobs never read a half-written file
            log.info("pre-trained AE cached at %s", path)
        return {"pretrain_cached": 0.0, "pretrain_seconds": seconds, "pretrain_mse": mse}

    def train(self, encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, seed: int) -> tuple[int, float]:
        """SDCN's AE pre-training: MSE(x̂, x), Adam, shuffled mini-batches. Returns (steps, last epoch's MSE)."""
        r = self.recipe
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=r["lr"])
        g = torch.Generator(device="cpu").manual_seed(seed)
        steps, mse = 0, float("nan")
        for _ in range(r["epochs"]):
            perm = torch.randperm(len(x), generator=g).to(x.device)
            total, count = 0.0, 0
            for s in range(0, len(x), r["batch_size"]):
                xb = x[perm[s : s + r["batch_size"]]]
                loss = F.mse_loss(decoder(encoder(xb)), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(xb), count + len(xb)
                steps += 1
                if 0 <= r["max_steps"] <= steps:
                    break
            mse = total / max(count, 1)
            if 0 <= r["max_steps"] <= steps:
                break
        return steps, mse


def start_criteria(z: np.ndarray, km, seed: int, sample: int = 4000) -> dict[str, float]:
    """Label-free quality of a k-means start on z: the silhouette (on up to `sample` points, seeded) and the
    inertia over z's total sum of squares (the unexplained fraction: comparable across AEs whose z differ in
    scale, unlike the raw inertia)."""
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    total = float(((z - z.mean(0)) ** 2).sum())
    with threadpool_limits(1):  # see fit_kmeans: sklearn's pool contends with torch's
        sil = silhouette_score(z, km.labels_, sample_size=min(sample, len(z)), random_state=seed)
    return {"silhouette": float(sil), "inertia": float(km.inertia_) / max(total, 1e-12)}
