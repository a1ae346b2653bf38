"""Accuracy of a trained model's own classification heads (`eval=iat`): a fine-tuned classifier's task and
identity heads."""

from __future__ import annotations

import torch


class HeadAccuracy:
    """Top-1 accuracy of the model's own heads on the val split (outputs[pred_key] vs batch[label_key])."""

    def __init__(self, heads: dict[str, str] | None = None):
        self.heads = dict(heads or {"logits": "y"})

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        correct = {k: 0 for k in self.heads}
        n = 0
        for batch in ctx.batches("val", "head accuracy"):
            out = ctx.model(batch)
            for pred_key, label_key in self.heads.items():
                if pred_key in out:
                    correct[pred_key] += (out[pred_key].argmax(1) == batch[label_key]).sum().item()
            n += len(batch["x"])
        return {f"{k}_acc": v / max(n, 1) for k, v in correct.items()}
