"""Prototype network losses (Li et al. 2018): the interpretability regularisers R1 and R2 on the (B, M) squared
distances d_ij = ||f(x_i) - p_j||^2 the model outputs as `distances`. The full objective (conf/objective/
prototype_net.yaml) is 20 CE + 1 R + 1 R1 + 1 R2 with the existing ClassificationLoss and PixelMSE terms.
Both minima run over the current minibatch, as in the official code [card]."""

from __future__ import annotations

from aeforge.objectives import LossTerm


class PrototypeNearData(LossTerm):
    """R1 = (1/m) sum_j min_i d_ij: every prototype is close to at least one encoded input, so decoding it
    gives a realistic image."""

    def forward(self, outputs, batch):
        return outputs["distances"].float().min(dim=0).values.mean()


class DataNearPrototype(LossTerm):
    """R2 = (1/n) sum_i min_j d_ij: every encoded input is close to at least one prototype."""

    def forward(self, outputs, batch):
        return outputs["distances"].float().min(dim=1).values.mean()
