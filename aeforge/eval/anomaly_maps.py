"""Pixel-level anomaly maps (StRegA / ceVAE, `eval=anomaly_maps`) on a DataModule whose batches carry
`anomaly_mask` (B, 1, H, W) (aeforge/data/lesions.py), built on the image-level API of aeforge/eval/anomaly.py.

Per pixel, pooled over every image of the split (normal images contribute their negatives):
- pixel_auroc / pixel_auprc of the continuous map;
- dice_best: the best Dice over all thresholds on the test split (an oracle: pooled Dice is the pixel F1, so it
  is anomaly.best_f1 of the pixels), with threshold_best;
- dice_val_threshold: Dice on test at the threshold that is best on the validation split (threshold_val) — what
  a deployed detector tuned on labelled validation data gets;
- dice_postproc (pooled) and dice_postproc_per_image (mean ± std over lesioned images) of the model's own
  post-processing (`model.segment`: the card's clip / Otsu / area opening), when it has one.
Per image: image_auroc / image_auprc / image_best_f1 of `model.anomaly_score` (anomaly.anomaly_metrics).
Pixels outside `foreground` (the object / brain mask) are left out when within_foreground (the MRI convention:
scores inside the brain). A model without anomaly_map is scored by its reconstruction error |x̂ − x| (the plain
VAE baseline). Writes `anomaly_maps.png` (rows: input | map | true mask | post-processed mask) to out_dir.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aeforge.eval.anomaly import anomaly_metrics, best_f1
from aeforge.eval.skips import skipped


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Pooled Dice 2|P∩T| / (|P| + |T|) of two boolean arrays; 1 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"dice: prediction {pred.shape} and target {target.shape} differ in shape")
    denom = pred.sum() + target.sum()
    return 1.0 if denom == 0 else float(2 * (pred & target).sum() / denom)


def dice_per_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice of each image (first axis) of two boolean arrays."""
    return np.array([dice(p, t) for p, t in zip(pred, target)])


def reconstruction_error_map(model, batch: dict) -> torch.Tensor:
    """|x̂ − x| averaged over channels, (B, 1, H, W): the map of a model with only `reconstruct`."""
    return (model.reconstruct(batch).float() - batch["x"].float()).abs().mean(1, keepdim=True)


@torch.no_grad()
def collect_maps(ctx, split: str) -> dict[str, np.ndarray]:
    """maps (N, H, W) float, mask / foreground (N, H, W) bool, anomaly (N,), score (N,), the post-processed
    masks `segment` (when the model has one) and the inputs `x` (denormalised, up to 64) of `split`."""
    model = ctx.model
    has_map = hasattr(model, "anomaly_map")
    if not has_map and not hasattr(model, "reconstruct"):
        raise TypeError(f"{type(model).__name__} has neither anomaly_map() nor reconstruct()")
    parts: dict[str, list] = {k: [] for k in ("map", "mask", "foreground", "anomaly", "score", "segment", "x")}
    for batch in ctx.batches(split, f"anomaly maps ({split})"):
        if "anomaly_mask" not in batch:
            raise KeyError(f"split {split!r} of {type(ctx.datamodule).__name__} has no anomaly_mask: eval="
                           f"anomaly_maps needs lesion data (data=lesions_fashion_mnist or lesions_brainlike)")
        amap = model.anomaly_map(batch) if has_map else reconstruction_error_map(model, batch)
        fg = batch.get("foreground", torch.ones_like(batch["anomaly_mask"]))
        amap = amap.float() * fg.float()
        parts["map"].append(amap[:, 0].cpu())
        parts["mask"].append(batch["anomaly_mask"][:, 0].bool().cpu())
        parts["foreground"].append(fg[:, 0].bool().cpu())
        parts["anomaly"].append(batch["anomaly"].cpu())
        score = model.anomaly_score(batch) if hasattr(model, "anomaly_score") else amap.flatten(1).mean(1)
        parts["score"].append(score.float().flatten().cpu())
        if hasattr(model, "segment"):
            parts["segment"].append(model.segment(batch)[:, 0].bool().cpu())
        if sum(len(x) for x in parts["x"]) < 64:
            parts["x"].append(ctx.datamodule.denormalize(batch["x"].float()).cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items() if v}


def pixel_values(maps: dict, within_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
    keep = maps["foreground"] if within_foreground else np.ones_like(maps["mask"])
    return maps["map"][keep], maps["mask"][keep]


class AnomalyMapMetrics:
    """Dice (best / validation-chosen threshold / post-processed), pixel AUROC/AUPRC, image-level metrics."""

    def __init__(self, split: str = "test", val_split: str = "val", within_foreground: bool = True,
                 out_dir: str | None = None, num_grid: int = 8):
        self.split, self.val_split, self.within_foreground = split, val_split, within_foreground
        self.out_dir, self.num_grid = out_dir, num_grid

    def __call__(self, ctx) -> dict[str, float]:
        test = collect_maps(ctx, self.split)
        scores, labels = pixel_values(test, self.within_foreground)
        if not labels.any():
            return skipped(type(self).__name__, f"no lesion pixel in the {self.split} split")
        px = anomaly_metrics(scores, labels)
        out = {"pixel_auroc": px["auroc"], "pixel_auprc": px["auprc"], "lesion_pixel_rate": px["anomaly_rate"]}
        out["dice_best"], out["threshold_best"] = best_f1(scores, labels)
        val = collect_maps(ctx, self.val_split)
        vs, vl = pixel_values(val, self.within_foreground)
        if vl.any():
            _, out["threshold_val"] = best_f1(vs, vl)
            out["dice_val_threshold"] = dice(scores >= out["threshold_val"], labels)
        else:
            out.update(skipped(type(self).__name__, f"no lesion pixel in the {self.val_split} split",
                               "dice_val_threshold"))
        if "segment" in test:
            seg = test["segment"] & test["foreground"] if self.within_foreground else test["segment"]
            out["dice_postproc"] = dice(seg, test["mask"])
            lesioned = test["anomaly"] == 1
            per_image = dice_per_image(seg[lesioned], test["mask"][lesioned])
            out["dice_postproc_per_image"] = float(per_image.mean()) if len(per_image) else float("nan")
            out["dice_postproc_per_image_std"] = float(per_image.std()) if len(per_image) else float("nan")
        if 0 < test["anomaly"].mean() < 1:
            out.update({f"image_{k}": v for k, v in anomaly_metrics(test["score"], test["anomaly"]).items()})
        else:
            out.update(skipped(type(self).__name__, f"{self.split} split has one image class only", "image_auroc"))
        if self.out_dir:
            self.save_grid(test, Path(self.out_dir) / "anomaly_maps.png", out["threshold_best"])
        return out

    def save_grid(self, maps: dict, path: Path, threshold: float) -> None:
        """Rows of lesioned test images: input | map (scaled so the best threshold is mid-grey) | true mask |
        post-processed mask (if any)."""
        from torchvision.utils import make_grid, save_image

        n_x = len(maps["x"])
        idx = [i for i in np.flatnonzero(maps["anomaly"] == 1) if i < n_x][: self.num_grid]
        if not idx:
            return
        x = torch.from_numpy(maps["x"][idx])
        c = x.shape[1]
        scale = 2 * threshold if threshold > 0 else max(float(maps["map"].max()), 1e-12)
        cols = [x, torch.from_numpy(maps["map"][idx] / scale).clamp(0, 1), torch.from_numpy(maps["mask"][idx])]
        if "segment" in maps:
            cols.append(torch.from_numpy(maps["segment"][idx]))
        cols = [cols[0]] + [t.float()[:, None].expand(-1, c, -1, -1) for t in cols[1:]]
        tiles = torch.stack(cols, 1).flatten(0, 1)  # row-major: one image's columns side by side
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(tiles, nrow=len(cols), padding=2, pad_value=1.0), path)
