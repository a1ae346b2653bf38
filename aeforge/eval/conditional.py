"""Conditional generation (CAAE, card 8 "aeforge additions"): does moving the condition move what a classifier
reads, while the image's own condition still reconstructs it?

- A small CNN classifier is trained here, seeded, on the real training split (normalised images, the
  model's input space; capped by eval.max_samples), and scored on the real val split (`real_acc`).
- Each val image is encoded once and decoded at every condition k = 0..K-1 (`model.generate`); the classifier
  reads each output. `target_acc`: share of outputs read as their target condition (all targets);
  `moved_acc`: the same over targets other than the image's own (the real test of moving the condition);
  `own_acc`: at the own condition; `chance` = 1/K; `target_acc_<k>` per target.
- `psnr`, `ssim`, `l1`: the reconstruction at the image's own condition, on [0, 1] images (torchmetrics).
- `conditional_grid.png` in out_dir: rows = inputs, columns = the input, then conditions 0..K-1.
A model without `generate` (an unconditional AE, the baseline) ignores the condition: its output at every
target is its reconstruction, scored the same way."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from aeforge.eval.skips import skipped


def condition_classifier(shape: tuple[int, int, int], num_classes: int, channels: list[int]) -> nn.Module:
    """Stride-2 3x3 convs (BN, ReLU), then a linear layer on the flattened map (where things are matters)."""
    layers: list[nn.Module] = []
    c, h, w = shape
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
        c, h, w = ch, (h + 1) // 2, (w + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, num_classes))


class ConditionalGeneration:
    def __init__(
        self,
        classifier_epochs: int = 3,
        classifier_channels: list[int] = (32, 64, 128),
        classifier_lr: float = 1e-3,
        classifier_batch_size: int = 128,
        grid_inputs: int = 8,
        seed: int = 0,
        out_dir: str | None = None,
    ):
        self.epochs, self.channels, self.lr = classifier_epochs, list(classifier_channels), classifier_lr
        self.batch_size, self.grid_inputs, self.seed, self.out_dir = classifier_batch_size, grid_inputs, seed, out_dir

    def train_classifier(self, ctx, num_classes: int) -> nn.Module | None:
        xs, ys = [], []
        for batch in ctx.batches("train", "classifier data"):
            if "y" not in batch:
                return None
            xs.append(batch["x"].float())
            ys.append(batch["y"])
        x, y = torch.cat(xs), torch.cat(ys)
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):  # the classifier's init does not move the run's RNG
            torch.manual_seed(self.seed)
            clf = condition_classifier(tuple(x.shape[1:]), num_classes, self.channels).to(ctx.device)
        opt = torch.optim.Adam(clf.parameters(), lr=self.lr)
        clf.train()
        for _ in range(ctx.epochs(self.epochs)):
            for idx in torch.randperm(len(x), generator=g).split(self.batch_size):
                loss = F.cross_entropy(clf(x[idx.to(x.device)]), y[idx.to(y.device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return clf.eval()

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        who = type(self).__name__
        num_classes = getattr(ctx.datamodule, "num_classes", None)
        with torch.enable_grad():
            clf = self.train_classifier(ctx, num_classes) if num_classes else None
        if clf is None:
            return skipped(who, "the data has no labels to condition on and to classify")
        model = ctx.model
        conditional = hasattr(model, "generate")
        psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(ctx.device)
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(ctx.device)
        hits = torch.zeros(num_classes, num_classes)  # [own condition, target condition] correct reads
        real_hits, l1, n, grid = 0.0, 0.0, 0, None
        for batch in ctx.batches("val", "conditional generation"):
            y = batch["y"]
            real_hits += (clf(batch["x"].float()).argmax(1) == y).sum().item()
            recon = model.reconstruct(batch).float()
            a, b = ctx.datamodule.denormalize(recon).clamp(0, 1), ctx.datamodule.denormalize(batch["x"].float())
            psnr.update(a, b)
            ssim.update(a, b)
            l1 += (a - b).abs().mean(dim=(1, 2, 3)).sum().item()
            outs = []
            for k in range(num_classes):
                target = torch.full_like(y, k)
                out = model.generate(batch, target).float() if conditional else recon
                outs.append(out)
                correct = (clf(out).argmax(1) == k).float().cpu()
                hits[:, k].index_add_(0, y.cpu(), correct)
            n += len(y)
            if grid is None:
                m = min(self.grid_inputs, len(y))
                grid = torch.stack([batch["x"][:m].float(), *[o[:m] for o in outs]], dim=1)  # (m, 1 + K, C, H, W)
                grid = ctx.datamodule.denormalize(grid.flatten(0, 1)).clamp(0, 1).cpu()
        if n == 0:
            return skipped(who, "the val split is empty")
        own = torch.diagonal(hits).sum() / n
        moved = (hits.sum() - torch.diagonal(hits).sum()) / (n * (num_classes - 1))
        metrics = {
            "target_acc": (hits.sum() / (n * num_classes)).item(), "moved_acc": moved.item(),
            "own_acc": own.item(), "chance": 1.0 / num_classes, "real_acc": real_hits / n,
            "psnr": psnr.compute().item(), "ssim": ssim.compute().item(), "l1": l1 / n,
            **{f"target_acc_{k}": (hits[:, k].sum() / n).item() for k in range(num_classes)},
        }
        if self.out_dir and grid is not None:
            from torchvision.utils import save_image

            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            save_image(grid, Path(self.out_dir) / "conditional_grid.png", nrow=num_classes + 1, padding=2,
                       pad_value=1.0)
        return metrics
