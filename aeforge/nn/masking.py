"""Masking generators for masked image modelling.

Contract (shared by every generator): given a batch size, the number of tokens L and a device, return
`ids_keep` (B, K), `ids_restore` (B, L) and `mask` (B, L) with 1 = removed, 0 = visible. K is the same
for every sample so visible tokens stack into one tensor. The optional generator makes them seedable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Masks:
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


class RandomMasking:
    """MAE's per-sample random masking: argsort uniform noise, keep the K = floor(L (1 - ratio)) smallest."""

    def __init__(self, ratio: float = 0.75):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def num_keep(self, num_tokens: int) -> int:
        return int(num_tokens * (1 - self.ratio))

    def __call__(
        self, batch: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Masks:
        keep = self.num_keep(num_tokens)
        noise = torch.rand(batch, num_tokens, device=device, generator=generator)
        return masks_from_noise(noise, keep)


def masks_from_noise(noise: torch.Tensor, keep: int) -> Masks:
    """Keep the `keep` positions with the smallest noise; shared by every noise-ranking generator."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masks(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


# -- shared helpers for grid-aware generators --------------------------------------------------------------


def grid_of(num_tokens: int, grid: tuple[int, int] | list[int] | None = None) -> tuple[int, int]:
    """The (rows, cols) patch grid: `grid` if given, else the square root of the token count."""
    if grid is not None:
        gh, gw = int(grid[0]), int(grid[1])
        if gh * gw != num_tokens:
            raise ValueError(
                f"masking.grid={list(grid)} has {gh * gw} cells but the model has {num_tokens} tokens"
            )
        return gh, gw
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid: set masking.grid=[rows, cols]")
    return side, side


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def masks_from_binary(mask: torch.Tensor) -> Masks:
    """(B, L) 0/1 masks with the same count per row -> Masks; visible and masked ids in raster order."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must mask the same number of patches")
    num_tokens = mask.shape[1]
    keep = num_tokens - int(counts[0])
    order = mask.float() * num_tokens + torch.arange(num_tokens, device=mask.device, dtype=torch.float32)
    return masks_from_noise(order, keep)


# -- ColorMAE: filtered-noise masks (Hinojosa, Liu, Ghanem, ECCV 2024) -----------------------------------


def gaussian_response(size: int, sigma: float, device=None) -> torch.Tensor:
    """Frequency response (size, size) of a periodic Gaussian blur with std `sigma` pixels."""
    f = torch.fft.fftfreq(size, device=device, dtype=torch.float64)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    return torch.exp(-2 * math.pi**2 * sigma**2 * f2)


COLOR_SIGMAS = {"red": (2.0,), "blue": (1.0,), "green": (1.0, 3.0), "purple": (1.0, 3.0)}


def color_filter(color: str, size: int, sigmas, device=None) -> torch.Tensor:
    """Red = G_s (low-pass), blue = 1 - G_s (high-pass), green = G_s1 - G_s2 (band-pass, s1 < s2),
    purple = 1 - (G_s1 - G_s2) (band-stop); white = 1."""
    if color == "white":
        return torch.ones(size, size, dtype=torch.float64, device=device)
    s = tuple(sigmas)
    if color in ("red", "blue"):
        g = gaussian_response(size, s[0], device)
        return g if color == "red" else 1 - g
    if color in ("green", "purple"):
        if len(s) != 2 or not s[0] < s[1]:
            raise ValueError(f"{color} noise needs sigma=[s1, s2] with s1 < s2, got {list(s)}")
        band = gaussian_response(size, s[0], device) - gaussian_response(size, s[1], device)
        return band if color == "green" else 1 - band
    raise ValueError(f"unknown noise colour {color!r}; valid: {list(ColorNoiseMasking.COLORS)}")


def rank_normalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each pattern to uniform values in (0, 1) (keeps the ranking)."""
    flat = x.flatten(1)
    ranks = flat.argsort(1).argsort(1).to(torch.float32)
    return ((ranks + 0.5) / flat.shape[1]).view_as(x)


def color_noise_bank(
    color: str, num: int, size: int, sigmas=None, iterations: int = 1, seed: int = 0
) -> torch.Tensor:
    """(num, size, size) float32 patterns: white noise filtered (periodically, in the Fourier domain) by the
    colour's filter and histogram-equalised, `iterations` times ("noise alchemy": filter, re-normalise,
    repeat). One noise pixel = one patch. Values in (0, 1); the ranking is what masking uses."""
    sigmas = COLOR_SIGMAS.get(color, ()) if sigmas is None else sigmas
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num, size, size, generator=g, dtype=torch.float64)
    if color == "white":
        return x.float()
    h = color_filter(color, size, sigmas)
    for _ in range(max(iterations, 1)):
        x = torch.fft.ifft2(torch.fft.fft2(x - x.mean((1, 2), keepdim=True)) * h).real
        x = rank_normalize(x).double()
    return x.float()


def radial_power(patterns: torch.Tensor, bins: int | None = None) -> torch.Tensor:
    """Mean radially averaged power spectrum of (N, H, W) patterns (mean removed), bin k = |f| in
    [k, k+1) / H cycles per pixel, up to Nyquist."""
    n, h, w = patterns.shape
    x = patterns.double() - patterns.double().mean((1, 2), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).mean(0)
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() * min(h, w)
    bins = bins or min(h, w) // 2
    idx = radius.floor().long().clamp(max=bins)
    total = torch.zeros(bins + 1, dtype=torch.float64).index_add_(0, idx.flatten(), power.flatten())
    ones = torch.ones(h * w, dtype=torch.float64)
    count = torch.zeros(bins + 1, dtype=torch.float64).index_add_(0, idx.flatten(), ones)
    return (total / count.clamp_min(1))[1:bins]


class ColorNoiseMasking:
    """ColorMAE masking: rank a window of a precomputed filtered-noise pattern instead of uniform noise and
    keep the K = floor(L (1 - ratio)) *highest* values visible (exact ratio for every colour).

    Per batch (as the official generator): split the batch into chunks of `bank_size` samples; every chunk
    gets one random grid-sized crop offset and random horizontal / vertical flips (p = 0.5), applied to the
    whole pattern stack; a partial chunk uses the first patterns of the bank (`shuffle=true`: a random
    subset instead, an aeforge option). `color=white` draws fresh uniform noise and equals RandomMasking.

    The bank is generated here (`color_noise_bank`, seeded) unless `pattern_file` points at an .npz/.npy/.pt
    tensor (N, M, M') such as the official downloads; sigma, size and iterations are aeforge choices
    ([OPEN] in the paper card), in patch units."""

    COLORS = ("white", "red", "blue", "green", "purple")

    def __init__(
        self,
        ratio: float = 0.75,
        color: str = "green",
        sigma: list[float] | None = None,
        bank_size: int = 1024,
        pattern_size: int = 64,
        iterations: int = 1,
        pattern_file: str | None = None,
        seed: int = 0,
        shuffle: bool = False,
        grid: list[int] | None = None,
    ):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
        if color not in self.COLORS:
            raise ValueError(f"masking.color={color!r}; valid: {list(self.COLORS)}")
        if color != "white" and pattern_file is None:
            color_filter(color, 8, COLOR_SIGMAS[color] if sigma is None else sigma)  # validate early
        self.ratio, self.color, self.sigma = ratio, color, sigma
        self.bank_size, self.pattern_size, self.iterations = bank_size, pattern_size, iterations
        self.pattern_file, self.seed, self.shuffle, self.grid = pattern_file, seed, shuffle, grid
        self._bank: torch.Tensor | None = None
        self._banks_on: dict[str, torch.Tensor] = {}

    def num_keep(self, num_tokens: int) -> int:
        return int(num_tokens * (1 - self.ratio))

    def bank(self, device=None) -> torch.Tensor:
        if self._bank is None:
            self._bank = self._load() if self.pattern_file else color_noise_bank(
                self.color, self.bank_size, self.pattern_size, self.sigma, self.iterations, self.seed
            )
        key = str(device or "cpu")
        if key not in self._banks_on:
            self._banks_on[key] = self._bank.to(device)
        return self._banks_on[key]

    def _load(self) -> torch.Tensor:
        import numpy as np

        path = str(self.pattern_file)
        if path.endswith(".pt"):
            bank = torch.load(path, map_location="cpu", weights_only=True)
        else:
            data = np.load(path)
            bank = torch.from_numpy(np.asarray(data[data.files[0]] if hasattr(data, "files") else data))
        if bank.ndim != 3:
            raise ValueError(f"{path}: expected patterns of shape (N, M, M'), got {tuple(bank.shape)}")
        return bank.float()

    def __call__(
        self, batch: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Masks:
        keep = self.num_keep(num_tokens)
        if self.color == "white":  # the MAE path: fresh uniform noise, keep the smallest
            return masks_from_noise(torch.rand(batch, num_tokens, device=device, generator=generator), keep)
        gh, gw = grid_of(num_tokens, self.grid)
        bank = self.bank(device)
        n_pat, ph, pw = bank.shape
        if ph < gh or pw < gw:
            raise ValueError(f"noise patterns are {ph}x{pw}, smaller than the {gh}x{gw} patch grid")
        chunks = []
        for start in range(0, batch, n_pat):
            n = min(n_pat, batch - start)
            r = torch.randint(0, 2**31, (4,), generator=generator).tolist()
            if self.shuffle:
                g = torch.Generator().manual_seed(r[0])
                pats = bank[torch.randperm(n_pat, generator=g)[:n].to(bank.device)]
            else:
                pats = bank[:n]
            top, left = r[1] % (ph - gh + 1), r[2] % (pw - gw + 1)
            win = pats[:, top : top + gh, left : left + gw]
            if r[3] & 1:
                win = win.flip(2)
            if r[3] & 2:
                win = win.flip(1)
            chunks.append(win.reshape(n, gh * gw))
        noise = torch.cat(chunks).to(device)
        return masks_from_noise(-noise, keep)  # the highest values stay visible


# -- BEiT / CAE block-wise masking --------------------------------------------------------------------------


class BlockMasking:
    """BEiT-style block-wise masking, as in the CAE code: repeatedly place a rectangle of area
    s ~ U(min_num_patches, budget) and aspect ratio exp(U(log a, log 1/a)) at a random position, accepting
    it only if it masks 0 < n <= budget new cells, until exactly `num_masking_patches` cells are masked.

    The count is L - floor(L (1 - ratio)) (CAE: ratio 0.5 on 14x14 -> 98) unless `num_masking_patches` is
    given (mmpretrain's CAE config: 75). Masks are drawn per sample with numpy on the CPU (the official
    code does it in the data loader), seeded from the torch generator."""

    def __init__(
        self,
        ratio: float = 0.5,
        num_masking_patches: int | None = None,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        grid: list[int] | None = None,
        max_rounds: int = 10000,
    ):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
        self.ratio, self.num_masking_patches = ratio, num_masking_patches
        self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.grid, self.max_rounds = grid, max_rounds

    def num_masked(self, num_tokens: int) -> int:
        n = self.num_masking_patches
        n = num_tokens - int(num_tokens * (1 - self.ratio)) if n is None else int(n)
        if not 0 <= n < num_tokens:
            raise ValueError(f"cannot mask {n} of {num_tokens} patches")
        return n

    def num_keep(self, num_tokens: int) -> int:
        return num_tokens - self.num_masked(num_tokens)

    def _place(self, mask, budget: int, rng) -> int:
        gh, gw = mask.shape
        for _ in range(10):
            lo = self.min_num_patches  # like random.uniform, also when the budget is below the minimum
            area = lo + (budget - lo) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh:
                top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new
        return 0

    def sample(self, gh: int, gw: int, count: int, rng):
        import numpy as np

        mask = np.zeros((gh, gw), dtype=bool)
        cap = self.max_num_patches or count
        done, rounds = 0, 0
        while done < count:
            done += self._place(mask, min(count - done, cap), rng)
            rounds += 1
            if rounds >= self.max_rounds:  # practically unreachable; keeps the count exact regardless
                free = np.flatnonzero(~mask.ravel())
                mask.ravel()[rng.choice(free, count - done, replace=False)] = True
                break
        return mask

    def __call__(
        self, batch: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Masks:
        import numpy as np

        gh, gw = grid_of(num_tokens, self.grid)
        count = self.num_masked(num_tokens)
        rng = np.random.default_rng(_seed_from(generator))
        masks = np.stack([self.sample(gh, gw, count, rng).ravel() for _ in range(batch)])
        return masks_from_binary(torch.from_numpy(masks).to(device))
