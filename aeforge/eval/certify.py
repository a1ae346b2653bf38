"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019), as ZO-AE-DS reports it.

For each test image x, the smoothed classifier g(x) = argmax_c P[f(x + delta) = c], delta ~ N(0, sigma^2 I):
- selection: n0 noisy copies, c_A = the most frequent class of the base classifier f;
- estimation: n fresh noisy copies, n_A = how many give c_A; p_A_lower = the one-sided (1 - alpha)
  Clopper-Pearson lower bound on P[f(x + delta) = c_A] (scipy.stats.beta.ppf(alpha, n_A, n - n_A + 1));
- p_A_lower <= 1/2: abstain; else certified radius R = sigma * Phi^{-1}(p_A_lower) (L2).
Certified accuracy at r: the fraction of images predicted correctly (not abstained) with R >= r; r = 0 is the
smoothed classifier's clean accuracy. The noise is added in pixel space [0, 1] (the DataModule's
normalisation is undone first and redone after), so sigma is in the paper's units.

The model must provide `classify(x) -> logits` (aeforge.models.zo_ae_ds models do); others are skipped.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from aeforge.eval.skips import skipped


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (0 when n_a = 0)."""
    return 0.0 if n_a == 0 else float(stats.beta.ppf(alpha, n_a, n - n_a + 1))


def certify_from_counts(counts0: np.ndarray, counts: np.ndarray, alpha: float, sigma: float) -> tuple[int, float]:
    """(predicted class or -1 to abstain, certified L2 radius; -1.0 when abstaining) from the selection
    counts and the estimation counts (per class)."""
    c_a = int(np.argmax(counts0))
    p_a = lower_confidence_bound(int(counts[c_a]), int(counts.sum()), alpha)
    if p_a <= 0.5:
        return -1, -1.0
    return c_a, float(sigma * stats.norm.ppf(p_a))


def certified_accuracy(pred: np.ndarray, radius: np.ndarray, y: np.ndarray, radii: list[float]) -> dict[str, float]:
    correct = (pred == y) & (pred >= 0)
    return {f"certified_acc@{r:g}": float((correct & (radius >= r)).mean()) for r in radii}


class Certify:
    """Evaluator (eval=certify): CERTIFY of Cohen et al. on the first `max_samples` images of `split`.

    sigma: noise level (the training sigma of the model); n0 / n: selection / estimation samples; alpha:
    failure probability; batch_size: noisy copies per forward; radii: where certified accuracy is reported."""

    def __init__(self, sigma: float, n0: int = 100, n: int = 10000, alpha: float = 0.001, batch_size: int = 1000,
                 radii: list[float] | None = None, max_samples: int | None = 500, split: str = "val", seed: int = 0):
        if sigma <= 0:
            raise ValueError(f"certify.sigma={sigma}: the smoothing noise must be > 0")
        if not 0 < alpha < 1:
            raise ValueError(f"certify.alpha={alpha}: must be in (0, 1)")
        if split not in ("train", "val"):
            raise ValueError(f"certify.split={split!r}: valid choices are ['train', 'val']")
        self.sigma, self.n0, self.n, self.alpha, self.batch_size = sigma, n0, n, alpha, batch_size
        self.radii = list(radii) if radii is not None else [0.0, 0.25, 0.5, 0.75]
        self.max_samples, self.split, self.seed = max_samples, split, seed

    def _counts(self, model, x_pixel: torch.Tensor, num: int, num_classes: int, norm, gen) -> np.ndarray:
        counts = np.zeros(num_classes, dtype=np.int64)
        left = num
        while left > 0:
            k = min(self.batch_size, left)
            noise = torch.randn((k, *x_pixel.shape), generator=gen, device="cpu").to(x_pixel.device)
            pred = model.classify(norm(x_pixel.unsqueeze(0) + self.sigma * noise)).argmax(1)
            counts += np.bincount(pred.cpu().numpy(), minlength=num_classes)[:num_classes]
            left -= k
        return counts

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model, dm = ctx.model, ctx.datamodule
        if not hasattr(model, "classify"):
            return skipped(type(self).__name__, f"{type(model).__name__} has no classify(x) -> logits")
        num_classes = getattr(dm, "num_classes", None)
        if not num_classes:
            return skipped(type(self).__name__, "the data has no labels")
        denorm = getattr(dm, "denormalize", lambda t: t)
        norm = (lambda t: dm.normalize(t)) if hasattr(dm, "normalize") else (lambda t: t)
        gen = torch.Generator().manual_seed(self.seed)
        limit = self.max_samples if self.max_samples is not None else ctx.max_samples
        preds, radii, labels = [], [], []
        for batch in dm.eval_dataloader(self.split, 64):
            batch = ctx.device_batch(batch)
            for x, y in zip(denorm(batch["x"]), batch["y"]):
                if limit is not None and len(labels) >= limit:
                    break
                counts0 = self._counts(model, x, self.n0, num_classes, norm, gen)
                counts = self._counts(model, x, self.n, num_classes, norm, gen)
                pred, radius = certify_from_counts(counts0, counts, self.alpha, self.sigma)
                preds.append(pred), radii.append(radius), labels.append(int(y))
            if limit is not None and len(labels) >= limit:
                break
        pred, radius, y = np.array(preds), np.array(radii), np.array(labels)
        out = certified_accuracy(pred, radius, y, self.radii)
        out |= {"abstain_rate": float((pred < 0).mean()), "images": float(len(y)),
                "mean_radius_correct": float(np.where((pred == y), radius, 0.0).mean()),
                "sigma": self.sigma, "n": float(self.n), "n0": float(self.n0), "alpha": self.alpha}
        return out
