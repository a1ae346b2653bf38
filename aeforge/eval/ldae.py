"""LDAE's evaluations (card 7) on a volume DataModule (aeforge/data/volumes.py, batches with `y` and `factor`).

- `SemanticProbe`: linear probes of `model.encode` (y_sem at stage semantic): logistic regression on the train
  split scored by ROC-AUC (binary: P(class 1); more classes: one-vs-rest macro) and accuracy on `split`, and a
  ridge regression of the continuous factor (age) scored by its MAE, beside the MAE of predicting the train
  mean (the chance level). Features are standardised on the train split; volumes without a factor are left out.
- `DiffusionReconstruction`: on `split`, SSIM (3-D Gaussian window) and MSE on [0, 1] volumes of the AEKL's
  reconstruction and of DDIM encode (η = 0) → DDIM decode with `steps` steps (shifted by y at stage semantic),
  and — at stage semantic, `from_noise=true` — of the decode from z_T ~ N(0, I) with y only; the first
  `max_volumes` volumes of the split (null: all)."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

from aeforge.eval.skips import skipped


def _collect(ctx, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats, ys, factors = [], [], []
    with torch.no_grad():
        for batch in ctx.batches(split, f"semantic features ({split})"):
            feats.append(ctx.model.encode(batch).float().flatten(1).cpu())
            ys.append(batch["y"].cpu())
            factors.append(batch["factor"].float().cpu())
    return torch.cat(feats).numpy(), torch.cat(ys).numpy(), torch.cat(factors).numpy()


class SemanticProbe:
    def __init__(self, split: str = "test", max_iter: int = 2000, C: float = 1.0, alpha: float = 1.0):
        self.split, self.max_iter, self.C, self.alpha = split, max_iter, C, alpha

    def __call__(self, ctx) -> dict[str, float]:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.metrics import roc_auc_score
        from sklearn.preprocessing import StandardScaler

        xtr, ytr, ftr = _collect(ctx, "train")
        xte, yte, fte = _collect(ctx, self.split)
        scaler = StandardScaler().fit(xtr)
        xtr, xte = scaler.transform(xtr), scaler.transform(xte)
        out: dict[str, float] = {}
        if len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
            out.update(skipped(type(self).__name__, f"the train or {self.split} split has one class only", "roc_auc"))
        else:
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(xtr, ytr)
            prob = clf.predict_proba(xte)
            auc = (roc_auc_score(yte, prob[:, 1]) if prob.shape[1] == 2
                   else roc_auc_score(yte, prob, multi_class="ovr", labels=clf.classes_))
            out.update(roc_auc=float(auc), accuracy=float((clf.predict(xte) == yte).mean()))
        ok_tr, ok_te = np.isfinite(ftr), np.isfinite(fte)
        if ok_tr.sum() < 2 or ok_te.sum() < 1:
            out.update(skipped(type(self).__name__, "too few volumes with a factor value", "factor_mae"))
        else:
            reg = Ridge(alpha=self.alpha).fit(xtr[ok_tr], ftr[ok_tr])
            out["factor_mae"] = float(np.abs(reg.predict(xte[ok_te]) - fte[ok_te]).mean())
            out["factor_mae_chance"] = float(np.abs(ftr[ok_tr].mean() - fte[ok_te]).mean())
        return out


def volume_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-volume SSIM of (B, C, D, H, W) volumes in [0, 1], 3-D Gaussian window (11, or the odd size that fits)."""
    k = min(11, min(a.shape[2:]) - (1 - min(a.shape[2:]) % 2))
    return ssim_fn(a.float(), b.float(), data_range=1.0, kernel_size=k, sigma=1.5 * k / 11, reduction="none")


class DiffusionReconstruction:
    def __init__(self, split: str = "test", steps: int = 100, from_noise: bool = True, seed: int = 0,
                 max_volumes: int | None = None):
        if steps < 1:
            raise ValueError(f"eval DiffusionReconstruction steps must be >= 1, got {steps}")
        self.split, self.steps, self.from_noise, self.seed = split, steps, from_noise, seed
        self.max_volumes = max_volumes

    def __call__(self, ctx) -> dict[str, float]:
        model, dm = ctx.model, ctx.datamodule
        if not hasattr(model, "aekl_reconstruct"):
            return skipped(type(self).__name__, f"{type(model).__name__} is not an LDAE model")
        paths = {"aekl": model.aekl_reconstruct}
        if getattr(model, "stage", "aekl") != "aekl":
            paths["ddim"] = lambda b: model.ddim_reconstruct(b, self.steps)
            if model.stage == "semantic" and self.from_noise:
                g = torch.Generator(device=ctx.device).manual_seed(self.seed)
                paths["semantic_only"] = lambda b: model.reconstruct_from_semantic(b, self.steps, g)
        ssim = {k: [] for k in paths}
        mse = {k: [] for k in paths}
        with torch.no_grad():
            seen = 0
            for batch in ctx.batches(self.split, "reconstructions (AEKL / DDIM)"):
                if self.max_volumes is not None and seen >= self.max_volumes:
                    break
                seen += len(batch["x"])
                x = dm.denormalize(batch["x"])
                for name, fn in paths.items():
                    r = dm.denormalize(fn(batch).float())
                    ssim[name].append(volume_ssim(r, x).cpu())
                    mse[name].append((r - x).pow(2).flatten(1).mean(1).cpu())
        out = {}
        for name in paths:
            out[f"ssim_{name}"] = float(torch.cat(ssim[name]).mean())
            out[f"mse_{name}"] = float(torch.cat(mse[name]).mean())
        if not out:
            return skipped(type(self).__name__, f"the {self.split} split is empty")
        return out
