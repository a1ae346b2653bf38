"""Deep-linear JEPA vs MAE (card 8, Littwin et al. 2024): the per-feature gradient-flow ODEs as the reference, and
the evaluator that reads the learning curves a `DeepLinearSSL` model recorded and compares the learning time of
each feature with the ODE's.

Balanced diagonal case (card 8.3, re-derived): every layer and the head of feature i equal one scalar u_i(t),
the encoder's end-to-end gain is w̄_i = u_i^L, and with σ² = λ/ρ
    JEPA: du/dt = u^{2L} (λ − σ² u)            fixed point w̄* = ρ^L
    MAE:  du/dt = u^{L}  (λ − σ² u^{L+1})      fixed point w̄* = ρ^{L/(L+1)}
from u(0) = ε^{1/L} (w̄(0) = ε). The learning time of a feature is the first t with w̄(t) ≥ fraction · w̄*
(card: fraction ½); it is NaN when w̄(0) already meets it (card pitfall 8.6.2: the feature is not "learned").
Time is gradient-flow time: GD with learning rate η reaches time t after t/η steps.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy.integrate import quad, solve_ivp

from aeforge.config import ConfigError
from aeforge.eval.skips import skipped
from aeforge.objectives.deep_linear import TARGETS

DYNAMICS = ("jepa", "mae")


def _check(dynamics: str) -> None:
    if dynamics not in DYNAMICS:
        raise ConfigError(f"deep-linear dynamics {dynamics!r}; valid: {list(DYNAMICS)}")


def fixed_point(rho: float, depth: int, dynamics: str) -> float:
    """w̄* of the encoder's end-to-end gain."""
    _check(dynamics)
    return rho**depth if dynamics == "jepa" else rho ** (depth / (depth + 1))


def du_dt(u, lam: float, rho: float, depth: int, dynamics: str):
    """The scalar layer value's gradient flow (works on floats and numpy arrays)."""
    sigma2 = lam / rho
    if dynamics == "jepa":
        return u ** (2 * depth) * (lam - sigma2 * u)
    return u**depth * (lam - sigma2 * u ** (depth + 1))


def critical_time(lam: float, rho: float, depth: int, init_scale: float, dynamics: str,
                  fraction: float = 0.5) -> float:
    """t* = ∫ du / f(u) from u0 = ε^{1/L} to the u at which w̄ = fraction · w̄*, by quadrature in s = log u
    (the integrand spans many orders of magnitude in u). NaN when w̄(0) ≥ fraction · w̄*."""
    _check(dynamics)
    u0 = init_scale ** (1 / depth)
    u_end = (fraction * fixed_point(rho, depth, dynamics)) ** (1 / depth)
    if u_end <= u0:
        return math.nan

    def integrand(s: float) -> float:
        u = math.exp(s)
        return u / du_dt(u, lam, rho, depth, dynamics)

    value, _ = quad(integrand, math.log(u0), math.log(u_end), limit=200, epsabs=0.0, epsrel=1e-10)
    return float(value)


def ode_curve(lam: float, rho: float, depth: int, init_scale: float, dynamics: str, t: np.ndarray) -> np.ndarray:
    """w̄(t) on the times `t` (ascending, from 0), integrated in s = log u (stiff-safe: LSODA)."""
    _check(dynamics)

    def rhs(_, s):
        u = np.exp(s)
        return du_dt(u, lam, rho, depth, dynamics) / u

    sol = solve_ivp(rhs, (0.0, float(t[-1])), [math.log(init_scale) / depth], t_eval=t, method="LSODA",
                    rtol=1e-9, atol=1e-12)
    return np.exp(depth * sol.y[0])


def crossing_time(t: np.ndarray, w: np.ndarray, threshold: float) -> float:
    """First time the sampled curve w(t) reaches `threshold`, linearly interpolated between samples; NaN if it
    starts there, inf if it never gets there."""
    above = np.nonzero(w >= threshold)[0]
    if len(above) == 0:
        return math.inf
    k = int(above[0])
    if k == 0:
        return math.nan
    t0, t1, w0, w1 = t[k - 1], t[k], w[k - 1], w[k]
    return float(t0 + (threshold - w0) / (w1 - w0) * (t1 - t0))


class LearningTimes:
    """Evaluator: per feature i, the learning time t_gd_i measured on the model's recorded curve w̄_i(step · lr),
    the ODE's t_ode_i, their relative difference and w̄_i / w̄_i* at the end. `target`: the loss term's target
    (embedding: JEPA, view: MAE; which ODE applies); `lr`, `optimizer`, `momentum`, `schedule`: the optimiser
    (time = step · lr is gradient-flow time for plain constant-lr GD only; otherwise the relative errors are
    left out and the skip is recorded). `curves`: a CSV path for the per-feature learning curves (null: none)."""

    def __init__(self, target: str, lr: float, optimizer: str = "sgd", momentum: float = 0.0,
                 schedule: str = "constant", fraction: float = 0.5, curves: str | None = None):
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"eval learning_times.fraction={fraction}: it must be in (0, 1)")
        if target not in TARGETS:
            raise ConfigError(f"eval learning_times.target={target!r}; valid: {sorted(TARGETS)} (embedding = JEPA, "
                              f"view = MAE)")
        self.dynamics = TARGETS[target]
        self.lr, self.fraction, self.curves = lr, fraction, curves
        self.plain_gd = optimizer == "sgd" and momentum == 0.0 and schedule == "constant"

    def __call__(self, ctx) -> dict[str, float]:
        model, dm = ctx.model, ctx.datamodule
        steps, wbar, head = model.trajectory()
        t = steps.astype(np.float64) * self.lr
        depth, eps = model.depth, model.init_scale
        out: dict[str, float] = {"depth": float(depth), "init_scale": eps, "t_end": float(t[-1])}
        rows = []
        for i, (lam, rho) in enumerate(zip(dm.lam, dm.rho)):
            target = fixed_point(rho, depth, self.dynamics)
            t_gd = crossing_time(t, wbar[:, i], self.fraction * target)
            t_ode = critical_time(lam, rho, depth, eps, self.dynamics, self.fraction)
            out.update({f"t_gd_{i}": t_gd, f"t_ode_{i}": t_ode, f"final_{i}": float(wbar[-1, i] / target)})
            if math.isfinite(t_gd) and math.isfinite(t_ode) and self.plain_gd:
                out[f"rel_err_{i}"] = abs(t_gd - t_ode) / t_ode
            rows.append((lam, rho, target))
        if not self.plain_gd:
            out.update(skipped(type(self).__name__, "time = step · lr is gradient-flow time only for constant-lr "
                               "SGD without momentum", "ode_comparison"))
        if model.init != "balanced":
            out.update(skipped(type(self).__name__, f"model.init={model.init!r}: the scalar ODE holds for the "
                               "balanced init only (card 8.6.5)", "ode_exact"))
        if self.curves:
            self._write_curves(Path(self.curves), steps, t, wbar, head, rows)
        return out

    def _write_curves(self, path: Path, steps, t, wbar, head, rows) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "t", "feature", "lam", "rho", "wbar", "head", "wbar_over_fixed_point"])
            for k in range(len(steps)):
                for i, (lam, rho, target) in enumerate(rows):
                    w.writerow([int(steps[k]), f"{t[k]:.6g}", i, lam, rho, f"{wbar[k, i]:.6g}", f"{head[k, i]:.6g}",
                                f"{wbar[k, i] / target:.6g}"])
