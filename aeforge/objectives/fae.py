"""FAE's losses (card 6): stage feature_vae, L_VAE = ‖x̂_feat − x_feat‖² + β·KL(q(z | x_feat) ‖ N(0, I)) (plain L2,
no cosine or alignment term); stages pixel_decoder / pixel_finetune, λ_rec·L1 + λ_perc·LPIPS (+ GAN, not wired
here, see docs/methods/fae.md). One objective serves all stages: every term names the stages it belongs to and
is a constant 0 in the others (the model only produces the outputs of its stage)."""

from __future__ import annotations

import torch

from aeforge.objectives import LossTerm


class FeatureMSE(LossTerm):
    """Mean squared error between outputs["feat_pred"] and the frozen features outputs["feat"], over every
    element (so β is relative to a per-element error)."""

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        return (outputs["feat_pred"].float() - outputs["feat"].float()).pow(2).mean()


class TokenKL(LossTerm):
    """KL(N(μ, σ²) ‖ N(0, I)) of the token bottleneck: summed over a token's latent channels, averaged over
    tokens and images."""

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        mu, logvar = outputs["mu"].float(), outputs["logvar"].float()
        return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()


class StageTerm(LossTerm):
    """`term` in the stages listed in `stages`, a constant 0 in the others. `stage` is the run's (the recipe's
    top-level key, interpolated); a stage name outside `valid` is refused."""

    VALID = ("feature_vae", "pixel_decoder", "pixel_finetune")

    def __init__(self, term: LossTerm, stages: list[str], stage: str, weight: float = 1.0):
        super().__init__(weight)
        for s in [*stages, stage]:
            if s not in self.VALID:
                raise ValueError(f"FAE objective: stage {s!r} is not one of {list(self.VALID)}")
        self.term, self.active = term, stage in stages

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        if not self.active:
            return torch.zeros((), device=batch["x"].device)
        return self.term(outputs, batch)
