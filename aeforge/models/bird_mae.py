"""Bird-MAE (Rauch et al., arXiv 2504.12880): MAE on log-mel spectrograms.

What changes relative to `aeforge.models.mae.MAE` is the recipe, not the network:
- input (B, 1, time, mel) from `aeforge.data.audio` (Kaldi fbank front end; 512 x 128 at 32 kHz in the
  paper, here whatever the DataModule gives), patch 16 on a rectangular time x frequency grid with fixed
  2-D sin-cos positions (rows = time, columns = mel bins);
- a plain ViT decoder (`mode: std`), norm-pix MSE on masked patches, random masking r = 0.75;
- AdamW (0.9, 0.95), wd 1e-4, blr 1e-4, warmup 9.375 % of the steps, waveform mixup p = 0.3 (in the data).
- frozen-encoder evaluation by prototypical probing (`aeforge.eval.prototypical`), which reads the patch
  tokens through `tokens(batch)` and `grid`.
"""

from __future__ import annotations

import torch

from aeforge.models.mae import MAE


class BirdMAE(MAE):
    """MAE with a 1-channel spectrogram input. `tokens(batch)` -> (B, 1 + L, D), the final-norm token sequence
    of the unmasked encoder (cls first), laid out row-major over `grid` = (time patches, mel patches)."""

    def __init__(self, input_shape: tuple[int, int, int], pool: str = "cls", **kwargs):
        if input_shape[0] != 1:
            raise ValueError(f"Bird-MAE expects 1-channel spectrograms, got input_shape {tuple(input_shape)}")
        super().__init__(input_shape, pool=pool, **kwargs)

    def tokens(self, batch) -> torch.Tensor:
        return self.encoder(batch["x"])
