"""The linear probe on a label other than `y` (e.g. `speaker`): FMAE-IAT's identity probe (`eval=iat`)."""

from __future__ import annotations

import torch

from aeforge.eval.probes import LinearProbe


class _KeyedContext:
    """An EvalContext view whose labels are batch[label_key] instead of batch["y"]."""

    def __init__(self, ctx, label_key: str):
        self.ctx, self.label_key = ctx, label_key
        self.has_labels = True
        self.epochs = ctx.epochs  # the eval.max_epochs cap, as for any evaluator that trains

    @torch.no_grad()
    def features(self, split: str):
        key = f"keyed/{split}/{self.label_key}"
        if key not in self.ctx.cache:
            feats, labels = [], []
            for batch in self.ctx.batches(split, f"features ({split}, {self.label_key})"):
                feats.append(self.ctx.model.encode(batch).float().flatten(1).cpu())
                labels.append(batch[self.label_key].cpu())
            self.ctx.cache[key] = (torch.cat(feats), torch.cat(labels))
        return self.ctx.cache[key]


class KeyedLinearProbe(LinearProbe):
    """The MAE linear probe (BN + linear on frozen features) on another label, e.g. `speaker`: FMAE-IAT's
    identity probe (lower accuracy = less identity information in the features)."""

    def __init__(self, label_key: str = "speaker", **kwargs):
        super().__init__(**kwargs)
        self.label_key = label_key

    def __call__(self, ctx) -> dict[str, float]:
        return super().__call__(_KeyedContext(ctx, self.label_key))
