"""ZO-AE-DS's loss term: the mean over the batch of the per-sample black-box loss the model computed
(`outputs["zo_loss"]`, CE(F(Dec(z)), y)). Its gradient w.r.t. the encoder output is the model's ZO estimate
(or the true gradient for estimator=fo): the model, which owns the black box, decides how it is obtained."""

from __future__ import annotations

from aeforge.objectives import LossTerm


class BlackBoxLoss(LossTerm):
    def __init__(self, weight: float = 1.0, key: str = "zo_loss"):
        super().__init__(weight)
        self.key = key

    def forward(self, outputs, batch):
        return outputs[self.key].mean()
