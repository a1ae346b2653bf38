"""Representation evaluators on frozen features: linear probe and weighted kNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.eval.skips import skipped


class LinearProbe:
    """BatchNorm (no affine) + linear classifier trained on frozen train features (the MAE linear-probe
    head), reported as top-1 accuracy on the val split."""

    def __init__(self, epochs: int = 100, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 0.0):
        self.epochs, self.lr, self.batch_size, self.weight_decay = epochs, lr, batch_size, weight_decay

    def __call__(self, ctx) -> dict[str, float]:
        if not ctx.has_labels:
            return skipped(type(self).__name__, "the data has no labels")
        (xtr, ytr), (xva, yva) = ctx.features("train"), ctx.features("val")
        n_cls = int(max(ytr.max(), yva.max())) + 1
        g = torch.Generator().manual_seed(0)
        head = nn.Sequential(nn.BatchNorm1d(xtr.shape[1], affine=False, eps=1e-6), nn.Linear(xtr.shape[1], n_cls))
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        epochs = ctx.epochs(self.epochs)  # eval.max_epochs (debug=smoke: 2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            for idx in torch.randperm(len(xtr), generator=g).split(self.batch_size):
                if len(idx) < 2:
                    continue
                loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            acc = (head(xva).argmax(1) == yva).float().mean().item()
            train_acc = (head(xtr).argmax(1) == ytr).float().mean().item()
        return {"acc": acc, "train_acc": train_acc}


class KNN:
    """Weighted k-nearest-neighbour vote on cosine similarity (weights exp(sim / T)), val top-1."""

    def __init__(self, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
        self.k, self.temperature, self.chunk = k, temperature, chunk

    def __call__(self, ctx) -> dict[str, float]:
        if not ctx.has_labels:
            return skipped(type(self).__name__, "the data has no labels")
        (xtr, ytr), (xva, yva) = ctx.features("train"), ctx.features("val")
        xtr, xva = F.normalize(xtr, dim=1), F.normalize(xva, dim=1)
        n_cls = int(max(ytr.max(), yva.max())) + 1
        k = min(self.k, len(xtr))
        correct = 0
        for q, yq in zip(xva.split(self.chunk), yva.split(self.chunk)):
            sim, idx = (q @ xtr.T).topk(k, dim=1)
            votes = torch.zeros(len(q), n_cls).scatter_add_(1, ytr[idx], (sim / self.temperature).exp())
            correct += (votes.argmax(1) == yq).sum().item()
        return {"acc": correct / len(xva)}
