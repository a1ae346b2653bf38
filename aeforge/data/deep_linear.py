"""Two-view linear data for the deep-linear JEPA-vs-MAE study (card 8, Littwin et al. 2024): `modality = "views"`.

Pairs (x, y) ∈ R^d × R^d, zero mean, with Σ_xx and Σ_yx diagonal: per feature i, λ_i = E[y_i x_i] (the
cross-covariance: card pitfall 8.6.1, not Var(x_i)) and ρ_i = λ_i / σ_i² (the regression coefficient of y_i on
x_i), so σ_i² = E[x_i²] = λ_i / ρ_i. The target view has E[y_i²] = max(σ_i², ρ_i λ_i): the static model of the
card (x = s + n_x, y = s + n_y, equal noise per view) when ρ_i ≤ 1, and the least variance that keeps the joint
covariance valid when ρ_i > 1. Only Σ_xx and Σ_yx enter the gradients of either loss.

`exact_moments` (default) whitens the drawn sample and colours it with the Cholesky factor of the joint
covariance, so the *empirical* second moments (1/n) are exactly the prescribed ones: full-batch GD on the sample
is then GD on the card's population loss, and the per-feature ODE is the exact reference. `batch_size: null`
(default) is that full batch; each training "epoch" is `steps_per_epoch` GD steps on it (fewer Lightning epoch
boundaries). An int batch size gives shuffled mini-batches (SGD, outside the paper's setting).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch


class _RepeatedBatch(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict[str, torch.Tensor], repeats: int):
        self.batch, self.repeats = batch, repeats

    def __iter__(self):
        for _ in range(self.repeats):
            yield self.batch

    def __len__(self) -> int:
        return self.repeats


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        return {"x": self.x[i], "target": self.y[i]}


def joint_covariance(lam: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """The 2d × 2d covariance of (x, y) with diagonal blocks Σ_xx = diag(λ/ρ), Σ_yx = diag(λ), Σ_yy as above."""
    d = len(lam)
    sxx = lam / rho
    syy = np.maximum(sxx, rho * lam)
    cov = np.zeros((2 * d, 2 * d))
    cov[np.arange(d), np.arange(d)] = sxx
    cov[np.arange(d, 2 * d), np.arange(d, 2 * d)] = syy
    cov[np.arange(d), np.arange(d, 2 * d)] = lam
    cov[np.arange(d, 2 * d), np.arange(d)] = lam
    return cov


def sample_views(lam, rho, n: int, seed: int, exact_moments: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n pairs (x, y) with the prescribed moments (exactly, for the sample itself, when exact_moments)."""
    lam, rho = np.asarray(lam, dtype=np.float64), np.asarray(rho, dtype=np.float64)
    d = len(lam)
    cov = joint_covariance(lam, rho)
    # eigh, not Cholesky: when ρ_i > 1 the joint covariance is singular (y_i is then a multiple of x_i)
    evals, evecs = np.linalg.eigh(cov)
    root = evecs * np.sqrt(np.clip(evals, 0.0, None))
    z = np.random.default_rng(seed).standard_normal((n, 2 * d))
    if exact_moments:
        z = z - z.mean(0)
        # whiten the sample: (1/n) zᵀz = I exactly
        evals_z, evecs_z = np.linalg.eigh(z.T @ z / n)
        z = z @ evecs_z @ np.diag(evals_z**-0.5) @ evecs_z.T
    xy = z @ root.T
    return xy[:, :d], xy[:, d:]


class LinearViewsDataModule(pl.LightningDataModule):
    """Synthetic two-view data with per-feature cross-covariance λ and regression coefficient ρ (card 8.2)."""

    modality = "views"

    def __init__(self, lam: list[float], rho: list[float], num_samples: int = 4096, batch_size: int | None = None,
                 steps_per_epoch: int = 1000, exact_moments: bool = True, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if len(lam) != len(rho) or not lam:
            raise ValueError(f"data.lam and data.rho need one value per feature, got {len(lam)} and {len(rho)}")
        if any(v <= 0 for v in [*lam, *rho]):
            raise ValueError(f"data.lam={list(lam)} and data.rho={list(rho)} must be > 0 (λ is the cross-covariance "
                             f"E[y_i x_i], ρ = λ / Var(x_i))")
        d = len(lam)
        if exact_moments and num_samples < 2 * d + 1:
            raise ValueError(f"data.num_samples={num_samples}: exact_moments needs at least 2·d + 1 = {2 * d + 1}")
        if steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch={steps_per_epoch}: it must be >= 1")
        self.lam, self.rho = [float(v) for v in lam], [float(v) for v in rho]
        self.sigma2 = [v / r for v, r in zip(self.lam, self.rho)]
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.num_workers, self.seed = num_workers, seed
        self.exact_moments, self.num_samples = exact_moments, num_samples
        x, y = sample_views(self.lam, self.rho, num_samples, seed, exact_moments)
        self.x, self.y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        self.input_shape = (d,)
        self.num_classes = None

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None or self.batch_size >= self.num_samples

    def train_dataloader(self):
        if self.full_batch:
            ds = _RepeatedBatch({"x": self.x, "target": self.y}, self.steps_per_epoch)
            return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
        from aeforge.data.loading import ResumableLoader

        return ResumableLoader(_Rows(self.x, self.y), batch_size=self.batch_size, shuffle=True, seed=self.seed,
                               num_workers=self.num_workers)

    def val_dataloader(self):
        # the whole sample once: val/loss is the population loss (exact moments)
        return torch.utils.data.DataLoader(_RepeatedBatch({"x": self.x, "target": self.y}, 1), batch_size=None)

    def eval_dataloader(self, split: str, batch_size: int):
        return torch.utils.data.DataLoader(_Rows(self.x, self.y), batch_size=batch_size,
                                           collate_fn=lambda b: b)

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        return x

    def describe(self) -> str:
        mode = "full batch" if self.full_batch else f"batches of {self.batch_size}"
        pairs = ", ".join(f"({a:g}, {r:g})" for a, r in zip(self.lam, self.rho))
        return f"LinearViewsDataModule(d={len(self.lam)}, (λ, ρ) = {pairs}, n={self.num_samples}, {mode})"
