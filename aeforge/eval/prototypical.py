"""Prototypical probing (Bird-MAE, §6.7 of the method card; after the official `ppnet` head).

On the frozen, unmasked encoder's final-norm tokens:
1. optional focal similarity: subtract the cls token from every patch token;
2. reshape the patch tokens to a D x grid map and upsample it x2 (bilinear);
3. J prototypes per class, similarity ReLU(cos(h_u, p_cj)) at every location u, max-pooled over u;
4. logit_c = sum_j ReLU(w_cj) a_cj + b_c: each class sees only its own J prototypes, weights >= 0;
5. loss = classification loss + orth_weight * ||[P_c P_c^T - I]_c||_F / (C J^2) on L2-normalised prototypes.

Bird-MAE trains with an asymmetric multi-label loss; single-label data (FSDD digits) uses cross-entropy
here (an aeforge choice). Returns top-1 accuracy and macro mAP (one-vs-rest) on the val split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.eval.skips import skipped


class PrototypeHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_prototypes: int = 20, bias_init: float = -2.0):
        super().__init__()
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.prototypes = nn.Parameter(torch.rand(num_classes, num_prototypes, dim))  # uniform init [C]
        self.last_layer = nn.Parameter(torch.ones(num_classes, num_prototypes))
        self.bias = nn.Parameter(torch.full((num_classes,), float(bias_init)))

    def similarities(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> max-pooled similarities (B, C, J)."""
        h = F.normalize(fmap.flatten(2), dim=1)  # (B, D, U)
        p = F.normalize(self.prototypes, dim=-1)  # (C, J, D)
        sim = torch.einsum("cjd,bdu->bcju", p, h).relu()
        return sim.amax(-1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        a = self.similarities(fmap)
        return (a * self.last_layer.relu()).sum(-1) + self.bias

    def orthogonality(self) -> torch.Tensor:
        p = F.normalize(self.prototypes, dim=-1)
        eye = torch.eye(self.num_prototypes, device=p.device)
        gram = p @ p.transpose(1, 2) - eye
        return gram.flatten().norm() / (self.num_classes * self.num_prototypes**2)


def token_map(
    tokens: torch.Tensor, grid: tuple[int, int], focal: bool = True, upsample: int = 2
) -> torch.Tensor:
    """(B, 1 + L, D) tokens (cls first) -> (B, D, gh * upsample, gw * upsample) feature map."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if focal:
        patches = patches - cls
    b, n, d = patches.shape
    fmap = patches.transpose(1, 2).reshape(b, d, *grid)
    if upsample and upsample != 1:
        fmap = F.interpolate(fmap, scale_factor=upsample, mode="bilinear", align_corners=False)
    return fmap


def macro_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """One-vs-rest average precision per class (classes present in `labels`), averaged."""
    aps = []
    for c in range(scores.shape[1]):
        pos = labels == c
        if not pos.any():
            continue
        order = scores[:, c].argsort(descending=True)
        hits = pos[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum().item() / hits.sum().item())
    return float(sum(aps) / len(aps)) if aps else math.nan


class PrototypicalProbe:
    """Evaluator: trains a PrototypeHead on frozen train-split tokens, reports val accuracy and macro mAP.

    Needs a model with `encoder` (or `tokens(batch)`) returning (B, 1 + L, D) and `grid`."""

    def __init__(
        self,
        num_prototypes: int = 20,
        epochs: int = 30,
        batch_size: int = 64,
        prototype_lr: float = 4e-2,
        last_layer_lr: float = 4e-4,
        orth_weight: float = 1.0,
        focal: bool = True,
        upsample: int = 2,
        bias_init: float = -2.0,
        label_key: str = "y",
    ):
        self.num_prototypes, self.epochs, self.batch_size = num_prototypes, epochs, batch_size
        self.prototype_lr, self.last_layer_lr, self.orth_weight = prototype_lr, last_layer_lr, orth_weight
        self.focal, self.upsample, self.bias_init, self.label_key = focal, upsample, bias_init, label_key

    @torch.no_grad()
    def _tokens(self, ctx, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = f"tokens/{split}/{self.label_key}"
        if key not in ctx.cache:
            model = ctx.model
            fn = getattr(model, "tokens", None) or (lambda b: model.encoder(b["x"]))
            toks, labels = [], []
            for batch in ctx.batches(split, f"tokens ({split})"):
                toks.append(fn(batch).float().cpu())
                if self.label_key in batch:
                    labels.append(batch[self.label_key].cpu())
            ctx.cache[key] = (torch.cat(toks), torch.cat(labels) if labels else None)
        return ctx.cache[key]

    def fit(self, toks: torch.Tensor, y: torch.Tensor, grid, num_classes: int) -> PrototypeHead:
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            head = PrototypeHead(toks.shape[-1], num_classes, self.num_prototypes, self.bias_init)
        opt = torch.optim.AdamW(
            [
                {"params": [head.prototypes], "lr": self.prototype_lr},
                {"params": [head.last_layer, head.bias], "lr": self.last_layer_lr},
            ],
            weight_decay=0.0,
        )
        steps = self.epochs * math.ceil(len(toks) / self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        for _ in range(self.epochs):
            for idx in torch.randperm(len(toks), generator=g).split(self.batch_size):
                fmap = token_map(toks[idx], grid, self.focal, self.upsample)
                loss = F.cross_entropy(head(fmap), y[idx]) + self.orth_weight * head.orthogonality()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return head

    def __call__(self, ctx) -> dict[str, float]:
        (xtr, ytr), (xva, yva) = self._tokens(ctx, "train"), self._tokens(ctx, "val")
        if ytr is None or yva is None:
            return skipped(type(self).__name__, "the data has no labels")
        grid = tuple(ctx.model.grid)
        n_cls = int(max(ytr.max(), yva.max())) + 1
        head = self.fit(xtr, ytr, grid, n_cls)
        with torch.no_grad():
            logits = torch.cat([head(token_map(t, grid, self.focal, self.upsample)) for t in xva.split(256)])
        return {
            "acc": (logits.argmax(1) == yva).float().mean().item(),
            "map": macro_average_precision(logits, yva),
            "trainable_params": float(sum(p.numel() for p in head.parameters())),
        }
