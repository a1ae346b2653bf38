"""Semantic segmentation of PHG-MAE-style models (`eval=phg_mae`): mIoU and frame-to-frame label flicker
of single-mask and K-mask ensemble predictions (`model.predict_semantic`)."""

from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount((target.flatten() * n + pred.flatten()).long(), minlength=n * n).reshape(n, n)


def mean_iou(conf: torch.Tensor) -> float:
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


class SegmentationEnsembleEval:
    """Semantic mIoU on the val clip for RGB-only input, all intermediate modalities, and K-mask ensembles
    (K in `ks`); `flicker_*` = fraction of pixels whose label changes between consecutive val frames."""

    def __init__(self, ks: list[int] | None = None, seed: int = 0):
        self.ks, self.seed = list(ks or [1, 4, 16]), seed

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model, dm = ctx.model, ctx.datamodule
        n = model.num_semantic
        modes = [("rgb_only", "rgb", 1), ("all_inputs", "all", 1)] + [
            (f"ensemble_k{k}", "random", k) for k in self.ks
        ]
        conf = {name: torch.zeros(n, n, dtype=torch.long) for name, _, _ in modes}
        flips = {name: [0, 0] for name, _, _ in modes}
        prev, target_flips, last_target = {}, [0, 0], None
        g = torch.Generator(device=ctx.device).manual_seed(self.seed)
        seen = 0
        for batch in dm.eval_dataloader("val", ctx.batch_size):
            if ctx.max_samples is not None and seen >= ctx.max_samples:
                break
            seen += len(batch["x"])
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            batch.update(dm.make(batch["x"]))
            for name, mode, k in modes:
                pred = model.predict_semantic(batch, k=k, mode=mode, generator=g).argmax(1).cpu()
                conf[name] += confusion(pred, batch["sem"].cpu(), n)
                seq = torch.cat([prev[name][None], pred]) if name in prev else pred
                flips[name][0] += (seq[1:] != seq[:-1]).sum().item()
                flips[name][1] += seq[1:].numel()
                prev[name] = pred[-1]
            sem = batch["sem"].cpu()
            seq = torch.cat([last_target[None], sem]) if last_target is not None else sem
            target_flips[0] += (seq[1:] != seq[:-1]).sum().item()
            target_flips[1] += seq[1:].numel()
            last_target = sem[-1]
        out = {"flicker_target": target_flips[0] / max(target_flips[1], 1)}
        for name, _, _ in modes:
            out[f"miou_{name}"] = mean_iou(conf[name])
            out[f"flicker_{name}"] = flips[name][0] / max(flips[name][1], 1)
        return out
