"""Deep linear self-distillation network for the JEPA-vs-MAE study (card 8, Littwin et al. 2024).

Encoder W̄ = W_L ⋯ W_1 (each d × d), head V (d × d): the predictor for JEPA, the decoder for MAE (the same module:
only the loss's target differs, aeforge/objectives/deep_linear.py). The target view y goes through the *same*
encoder weights (an EMA target with momentum 0), detached when `stop_grad_target` (card 8.6.4: the online branch
still trains W̄).

Initialisation (card 8.2, "balanced, small"): every layer and the head start at c = ε^{1/L} times an orthogonal
map, so W̄(0) = ε I and W_{a+1}ᵀ W_{a+1} = W_a W_aᵀ (= c² I); gradient flow keeps them balanced.
  init=balanced:            W_a = V = c I (the card's; the per-feature scalar ODE holds exactly)
  init=balanced_orthogonal: W_a = c Q_{a+1} Q_aᵀ with random orthogonal Q_2..Q_L, Q_1 = Q_{L+1} = I (balanced,
                            W̄ = ε I, but the layers themselves are not diagonal)
  init=random:              Gaussian layers scaled to end-to-end gain ~ε (not balanced; card 8.6.5 ablation)

The model records its learning curves: diag(W̄) and diag(V) after every `record_every` optimiser steps (and at
step 0), kept in its state dict (extra state, so they survive a resume) and read by the LearningTimes evaluator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from aeforge.models.base import AutoencoderModel

INITS = ("balanced", "balanced_orthogonal", "random")


class DeepLinearSSL(AutoencoderModel):
    modality = "views"

    def __init__(self, input_shape: tuple[int, ...] | list[int], depth: int = 2, init_scale: float = 1e-3,
                 init: str = "balanced", stop_grad_target: bool = True, record_every: int = 1, seed: int = 0):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"model.init={init!r}; valid: {list(INITS)}")
        if depth < 1:
            raise ValueError(f"model.depth={depth}: it must be >= 1")
        if not 0.0 < init_scale:
            raise ValueError(f"model.init_scale={init_scale}: it must be > 0")
        if record_every < 1:
            raise ValueError(f"model.record_every={record_every}: it must be >= 1")
        (d,) = tuple(input_shape)
        self.dim, self.depth, self.init_scale, self.init = d, depth, init_scale, init
        self.stop_grad_target, self.record_every = stop_grad_target, record_every
        layers = self._initial_layers(d, depth, init_scale, init, seed)
        self.layers = nn.ParameterList([nn.Parameter(m) for m in layers])
        self._records: list[tuple[int, torch.Tensor]] = []
        self._record(0)

    @staticmethod
    def _initial_layers(d: int, depth: int, eps: float, init: str, seed: int) -> list[torch.Tensor]:
        """`depth` encoder layers, then the head; built in float64 so balancedness holds to rounding."""
        c = eps ** (1.0 / depth)
        g = torch.Generator().manual_seed(seed)
        eye = torch.eye(d, dtype=torch.float64)
        if init == "random":
            # i.i.d. Gaussian with E|W x|² = c² |x|²: end-to-end gain ~ε, but no balance between layers
            mats = [c * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(depth + 1)]
        elif init == "balanced":
            mats = [c * eye for _ in range(depth + 1)]
        else:
            # Q_1 = Q_{L+1} = I and random orthogonal Q_2..Q_L: W_a = c Q_{a+1} Q_aᵀ, so W̄ = ε I and V = c I
            qs = [eye] + [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
                          for _ in range(depth - 1)] + [eye]
            mats = [c * qs[a + 1] @ qs[a].T for a in range(depth)] + [c * eye]
        return [m.float() for m in mats]

    # -- maps ---------------------------------------------------------------------------------------
    @property
    def encoder_layers(self) -> list[nn.Parameter]:
        return list(self.layers[: self.depth])

    @property
    def head(self) -> nn.Parameter:
        return self.layers[self.depth]

    def encoder_map(self) -> torch.Tensor:
        """W̄ = W_L ⋯ W_1."""
        w = self.layers[0]
        for layer in self.layers[1 : self.depth]:
            w = layer @ w
        return w

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder_layers:
            x = x @ layer.T
        return x

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z = self._encode(batch["x"])
        out = {"z": z, "pred": z @ self.head.T, "encoder_map": self.encoder_map()}
        if "target" in batch:
            if self.stop_grad_target:
                with torch.no_grad():
                    out["target_embedding"] = self._encode(batch["target"])
            else:
                out["target_embedding"] = self._encode(batch["target"])
        return out

    def encode(self, batch: dict) -> torch.Tensor:
        return self._encode(batch["x"])

    def reconstruct(self, batch: dict) -> torch.Tensor:
        """The prediction of the target view (the MAE decoder's output; for JEPA the predicted embedding)."""
        return self(batch)["pred"]

    # -- learning curves ----------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, step: int) -> None:
        w = torch.diagonal(self.encoder_map()).detach().double().cpu()
        v = torch.diagonal(self.head).detach().double().cpu()
        self._records.append((step, torch.stack([w, v])))

    def on_train_step_end(self, step: int, total: int | float) -> None:
        if step % self.record_every == 0 or step == total:
            self._record(step)

    def trajectory(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps (T,), diag W̄ (T, d), diag V (T, d)), in step order."""
        records = sorted({s: r for s, r in self._records}.items())
        steps = np.array([s for s, _ in records], dtype=np.int64)
        values = torch.stack([r for _, r in records]).numpy()
        return steps, values[:, 0], values[:, 1]

    def get_extra_state(self) -> dict:
        steps, w, v = self.trajectory()
        return {"steps": torch.from_numpy(steps), "wbar": torch.from_numpy(w), "head": torch.from_numpy(v)}

    def set_extra_state(self, state: dict) -> None:
        self._records = [(int(s), torch.stack([w, v])) for s, w, v in zip(state["steps"], state["wbar"], state["head"])]

