"""DDPM noise schedules with DDIM sampling and deterministic DDIM inversion (card 7, LDAE; card 9's MAR head).

Discrete time t = 0 … T−1, ᾱ_t = Π_{s ≤ t} (1 − β_s); forward process x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.
`ddim_sample` walks a sub-grid τ_1 < … < τ_S downwards to clean data (ᾱ = 1 past the first step);
`ddim_encode` walks the same grid upwards with η = 0 (the ODE's reverse), so decode(encode(x)) ≈ x for a good
ε-model, up to the discretisation error of evaluating ε at the start of each interval.

An ε-model is `eps_fn(x_t, t)` with t a (B,) long tensor."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features (B,) -> (B, dim): cos then sin of scale·t at geometrically spaced frequencies (the
    DDPM/DiT time embedding; flow times in [0, 1] pass scale=1000 so they spread like integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def _betas(kind: str, steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    if kind == "scaled_linear":  # latent diffusion's (Stable Diffusion, MONAI "scaled_linear_beta")
        return torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, β clipped at 0.999
        s = 0.008
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"noise schedule kind={kind!r}; valid: ['cosine', 'linear', 'scaled_linear']")


def _ddim_up(x: torch.Tensor, eps: torch.Tensor, a_cur: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    """The η = 0 DDIM move from ᾱ_cur to ᾱ_next with a given ε (either direction)."""
    return a_next.sqrt() * (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt() + (1 - a_next).sqrt() * eps


class NoiseSchedule(nn.Module):
    """β / ᾱ tables as (non-persistent) buffers; they follow the module to its device. Defaults: DDPM's linear
    1e-4 → 0.02 over 1000 steps (LDAE's latent DDPM)."""

    def __init__(self, kind: str = "linear", steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        if steps < 1:
            raise ValueError(f"noise schedule steps must be >= 1, got {steps}")
        betas = _betas(kind, steps, beta_start, beta_end)
        self.kind, self.steps = kind, steps
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)

    # -- tables -------------------------------------------------------------------------------------
    def alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t broadcast against `like` ((B, …)); t = −1 means clean data (ᾱ = 1)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64,
                                                                               device=t.device))
        return a.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t / (1 − ᾱ_t), shape (B,)."""
        a = self.alphas_cumprod[t.long().to(self.alphas_cumprod.device)]
        return (a / (1 - a)).float()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.steps, (n,), generator=generator, device=device)

    def timesteps(self, steps: int) -> list[int]:
        """An ascending sub-grid of `steps` timesteps from 0 to T − 1, evenly spaced."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"DDIM steps must be in [1, {self.steps}], got {steps}")
        if steps == 1:
            return [self.steps - 1]
        return torch.linspace(0, self.steps - 1, steps, dtype=torch.float64).round().long().tolist()

    # -- forward process and its inversions ---------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    # -- DDIM ---------------------------------------------------------------------------------------
    def ddim_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        t_prev: torch.Tensor | int,
        eps: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """x_t → x_{t_prev} (t_prev < t; t_prev = −1: clean data). η = 0 is deterministic DDIM, η = 1 DDPM-like:
        x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev − σ²)·ε + σ·z, σ = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·
        sqrt(1 − ᾱ_t/ᾱ_prev)."""
        a_t, a_prev = self.alpha_bar(t, x_t), self.alpha_bar(t_prev, x_t)
        x0 = self.predict_x0(x_t, t, eps)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = self.predict_eps(x_t, t, x0)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * (noise if noise is not None else torch.randn_like(x_t))
        return x_prev

    def ddim_sample(
        self,
        eps_fn: EpsFn,
        x_T: torch.Tensor,
        steps: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """Decode x_T (at the grid's top timestep) to data in `steps` DDIM steps."""
        grid = self.timesteps(steps)
        x = x_T
        for i in range(len(grid) - 1, -1, -1):
            t, t_prev = grid[i], grid[i - 1] if i > 0 else -1
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = eps_fn(x, tt)
            noise = None
            if eta > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.ddim_step(x, t, t_prev, eps, eta, noise, clip_x0)
        return x

    def ddim_encode(self, eps_fn: EpsFn, x0: torch.Tensor, steps: int, fixed_point_iters: int = 0) -> torch.Tensor:
        """Deterministic DDIM inversion (η = 0): data → x_T on the grid `ddim_sample` decodes with. Plain DDIM
        inversion (fixed_point_iters = 0, LDAE's/diffae's) evaluates ε of each upward step at its start (at the
        lowest timestep for the first step from clean data), a first-order error. Each fixed-point iteration
        re-solves the step with ε at its end, x_next = sqrt(ᾱ_next)·(x − sqrt(1 − ᾱ)·ε)/sqrt(ᾱ) +
        sqrt(1 − ᾱ_next)·ε, ε = eps_fn(x_next, t_next), so the decoder's step maps x_next back onto x
        (converged: decode(encode(x)) = x up to the iteration's tolerance)."""
        if fixed_point_iters < 0:
            raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
        grid = self.timesteps(steps)
        x = x0
        for i, t_next in enumerate(grid):
            t_cur = grid[i - 1] if i > 0 else -1
            eps = eps_fn(x, torch.full((x.shape[0],), max(t_cur, grid[0]), device=x.device, dtype=torch.long))
            a_cur, a_next = self.alpha_bar(t_cur, x), self.alpha_bar(t_next, x)
            x_next = _ddim_up(x, eps, a_cur, a_next)
            for _ in range(fixed_point_iters):
                eps = eps_fn(x_next, torch.full((x.shape[0],), t_next, device=x.device, dtype=torch.long))
                x_next = _ddim_up(x, eps, a_cur, a_next)
            x = x_next
        return x
