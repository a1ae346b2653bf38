"""Loss terms of the masked-image-modelling family beyond MAE's pixel loss (CAE, MR-MAE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeforge.objectives import LossTerm, Metric


class AlignmentMSE(LossTerm):
    """CAE alignment: mean over masked tokens and channels of (latent_pred - sg(latent_target))^2 [C].
    The target is detached here as well, so no gradient can reach the target branch."""

    def __init__(self, weight: float = 2.0, pred_key: str = "latent_pred", target_key: str = "latent_target"):
        super().__init__(weight)
        self.pred_key, self.target_key = pred_key, target_key

    def forward(self, outputs, batch):
        return F.mse_loss(outputs[self.pred_key].float(), outputs[self.target_key].detach().float())


class MaskedTokenCE(LossTerm):
    """CAE token target: cross-entropy of the decoder's logits (B, M, V) against the tokenizer's codes of
    the masked patches (B, M), averaged over every masked patch in the batch [C]. Logs nothing else; the
    token accuracy is available as the metric `MaskedTokenAccuracy`."""

    def __init__(self, weight: float = 1.0, logits_key: str = "logits", target_key: str = "token_target"):
        super().__init__(weight)
        self.logits_key, self.target_key = logits_key, target_key

    def forward(self, outputs, batch):
        logits = outputs[self.logits_key].float()
        return F.cross_entropy(logits.flatten(0, 1), outputs[self.target_key].flatten())


class MaskedTokenAccuracy(Metric):
    """Top-1 accuracy on masked tokens (a metric)."""

    def __init__(self, logits_key: str = "logits", target_key: str = "token_target"):
        super().__init__()
        self.logits_key, self.target_key = logits_key, target_key

    def forward(self, outputs, batch):
        with torch.no_grad():
            return (outputs[self.logits_key].argmax(-1) == outputs[self.target_key]).float().mean()


class VisibleMimicLoss(LossTerm):
    """MR-MAE mimic loss: for every teacher T, regress the frozen teacher's patch features at the *visible*
    positions from the student's visible encoder tokens (through a linear head), i.e. outputs
    `mimic_pred/<T>` and `mimic_target/<T>` of shape (B, K, C_T); summed over teachers with `weights`
    (default 1 each [OPEN]).

    target_norm: "layernorm" (LayerNorm without affine on the targets, aeforge default [OPEN]), "l2" or
    "none"; loss: "mse" (default [OPEN]), "smooth_l1" or "cosine"."""

    def __init__(
        self,
        weight: float = 1.0,
        target_norm: str = "layernorm",
        loss: str = "mse",
        weights: dict[str, float] | None = None,
    ):
        super().__init__(weight)
        if target_norm not in ("layernorm", "l2", "none"):
            raise ValueError(f"target_norm must be layernorm, l2 or none, got {target_norm!r}")
        if loss not in ("mse", "smooth_l1", "cosine"):
            raise ValueError(f"loss must be mse, smooth_l1 or cosine, got {loss!r}")
        self.target_norm, self.loss, self.weights = target_norm, loss, dict(weights or {})

    def _norm(self, t: torch.Tensor) -> torch.Tensor:
        if self.target_norm == "layernorm":
            return F.layer_norm(t, t.shape[-1:], eps=1e-6)
        if self.target_norm == "l2":
            return F.normalize(t, dim=-1)
        return t

    def forward(self, outputs, batch):
        names = [k.split("/", 1)[1] for k in outputs if k.startswith("mimic_pred/")]
        if not names:
            raise KeyError("VisibleMimicLoss needs outputs 'mimic_pred/<teacher>' (an MR-MAE model)")
        total = 0.0
        for name in names:
            pred = outputs[f"mimic_pred/{name}"].float()
            target = self._norm(outputs[f"mimic_target/{name}"].detach().float())
            if self.loss == "mse":
                value = F.mse_loss(pred, target)
            elif self.loss == "smooth_l1":
                value = F.smooth_l1_loss(pred, target)
            else:
                value = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
            total = total + self.weights.get(name, 1.0) * value
        return total
