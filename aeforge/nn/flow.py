"""Rectified flow / flow matching (card 2 stage 2, card 1's decoder, card 6's generator).

Convention (RAE's transport): x_t = (1 − t)·x + t·ε, t = 0 is data, t = 1 is noise; the model predicts the
velocity v = dx_t/dt = ε − x. Sampling integrates dx/dt = v from t = 1 to t = 0.

Time sampling: uniform or logit-normal (t = sigmoid(n), n ~ N(loc, scale²)), then the shift
t ← s·t / (1 + (s − 1)·t) (s > 1 moves mass towards noise), with the dimension rule s = sqrt(m / base) of RAE
(m = latent numel per sample, base = 4096). The sampler grid gets the same shift (`time_grid`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> v


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    """s·t / (1 + (s − 1)·t): a monotone map of [0, 1] onto itself (identity at s = 1)."""
    if s <= 0:
        raise ValueError(f"time shift must be > 0, got {s}")
    return s * t / (1 + (s - 1) * t)


def dimension_shift(latent_numel: int, base: int = 4096) -> float:
    """RAE's shift s = sqrt(latent_numel / base) (16·16·768 tokens → ≈ 6.93)."""
    if latent_numel < 1 or base < 1:
        raise ValueError(f"dimension_shift needs positive sizes, got latent_numel={latent_numel}, base={base}")
    return math.sqrt(latent_numel / base)


def sample_t(
    n: int,
    schedule: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training times in (0, 1): uniform or logit-normal(loc, scale), then shifted by `shift`."""
    if schedule == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif schedule == "logit_normal":
        t = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"flow time schedule={schedule!r}; valid: ['logit_normal', 'uniform']")
    return shift_time(t, shift)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.view(-1, *([1] * (x.ndim - 1)))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x + t·noise, t of shape (B,) (or a scalar)."""
    t = _expand(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise − x, the time derivative of `interpolate`."""
    return noise - x


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data): a uniform grid mapped by `shift_time`."""
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def euler_sample(velocity_fn: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Euler integration of dx/dt = v from t = 1 (x = noise) to t = 0 on the shifted grid."""
    grid = time_grid(steps, shift).tolist()
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = velocity_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
        x = x + (t_next - t) * v
    return x


def heun_sample(velocity_fn: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (Euler predictor, trapezoid corrector) on the shifted grid: 2 evaluations a
    step, except the last step into t = 0, which is Euler (as in EDM: the velocity at t = 0 is the least reliable
    and, for a sharp data distribution, singular)."""
    grid = time_grid(steps, shift).tolist()
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        v = velocity_fn(x, tt)
        x_pred = x + (t_next - t) * v
        if t_next == 0:
            x = x_pred
            break
        v_next = velocity_fn(x_pred, torch.full_like(tt, t_next))
        x = x + (t_next - t) * 0.5 * (v + v_next)
    return x


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_uncond + scale·(v_cond − v_uncond): classifier-free guidance with the unconditional velocity, or
    AutoGuidance (Karras et al. 2024) with a weaker model's conditional velocity as `v_uncond`. scale = 1 is
    the conditional model alone."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(strong: Velocity, weak: Velocity, scale: float) -> Velocity:
    """The velocity function `guided(strong(x, t), weak(x, t), scale)` for the samplers (scale 1: strong only,
    weak is not evaluated)."""
    if scale == 1.0:
        return strong
    return lambda x, t: guided(strong(x, t), weak(x, t), scale)
