"""MixedAE's homologous contrastive loss [A names it; the form is the method card's reconstruction, M]:
supervised InfoNCE over the patch tokens u_i of one mixed image, positives = tokens from the same source,

    L_HC = -1/L sum_i 1/|H(i)| sum_{j in H(i)} log( exp(cos(u_i,u_j)/tau) / sum_{k!=i} exp(cos(u_i,u_k)/tau) )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeforge.objectives import LossTerm, Metric


def homologous_contrastive(tokens: torch.Tensor, sources: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """tokens (G, L, D), sources (G, L) -> scalar loss averaged over every token of every mixed image."""
    u = F.normalize(tokens.float(), dim=-1)
    logits = u @ u.transpose(1, 2) / tau  # (G, L, L)
    eye = torch.eye(logits.shape[1], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - logits.logsumexp(-1, keepdim=True)
    pos = (sources[:, :, None] == sources[:, None, :]) & ~eye
    per_token = -(log_prob.masked_fill(~pos, 0.0).sum(-1)) / pos.sum(-1).clamp_min(1)
    return per_token.mean()


class HomologousContrastive(LossTerm):
    """outputs needs mix_tokens (G, L, D) and sources (G, L). weight = lambda, tau the temperature [OPEN]."""

    def __init__(self, weight: float = 1.0, tau: float = 0.2):
        super().__init__(weight)
        self.tau = tau

    def forward(self, outputs, batch):
        return homologous_contrastive(outputs["mix_tokens"], outputs["sources"], self.tau)


class LoggedOutput(Metric):
    """Logs a scalar the model computed (e.g. MixedAE's top-k homologous precision) as a metric."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, outputs, batch):
        v = outputs.get(self.key)
        return v.detach().float() if v is not None else torch.zeros(())
