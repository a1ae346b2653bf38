"""End-to-end fine-tuning (the MAE protocol): a copy of the encoder plus a classification head, trained on
the labelled train split, reported as top-1 / top-5 accuracy on the val split.

The trained model is never modified: the evaluator deep-copies the encoder and trains the copy.

- ViT encoders (`model.encoder` with `embed`, `run_blocks`, `blocks`, `cls_token`: MAE, CAE, Bird-MAE, MixedAE,
  MR-MAE): global average pool of the patch tokens + LayerNorm (`fc_norm`, replacing the final encoder
  norm) + linear head, or the normed cls token with `global_pool=false`. Layer-wise lr decay: block i of L
  (1-based) gets lr·decay^(L+1−i), patch embedding / cls / positions decay^(L+1), norms and head lr.
  Drop path (stochastic depth, linear in depth) goes into the timm blocks' `drop_path1/2` slots.
- any other model: `model.encode(batch)` flattened + LayerNorm + linear head. There is no block structure,
  so layer-wise decay has one layer: every parameter trains at lr (layer_decay has no effect) and
  `drop_path` is ignored.

Several processes (`torchrun ... scripts/evaluate.py ... eval=finetune`: ctx.world > 1, every rank here):
the network is wrapped in DistributedDataParallel, `batch_size` is per process and the lr rule uses the
global batch (batch_size × processes, as MAE's `eff_batch_size`). Every rank draws the same permutation of
the train set per epoch and takes every world-th position, so one step's batches together are the batch a
single process with world × the batch would draw. Augmentation randomness is seeded seed + rank. Every rank
evaluates the whole val split (the same numbers; rank 0 reports them).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from tqdm.auto import tqdm

from aeforge.eval.skips import skipped
from aeforge.modules.optim import layer_decay_groups, warmup_cosine
from aeforge.nn.vit import LayerNorm, vit_layer_id

log = logging.getLogger("aeforge")

# parameters that are never weight-decayed whatever their shape (MAE's no_weight_decay set)
NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "dist_token", "mask_token"})


def is_vit_encoder(module) -> bool:
    return all(hasattr(module, a) for a in ("embed", "run_blocks", "blocks", "cls_token"))


class ViTClassifier(nn.Module):
    """A ViT encoder (copied by the caller) + fc_norm + linear head; `forward(batch) -> logits`."""

    def __init__(self, encoder: nn.Module, num_classes: int, global_pool: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.encoder, self.global_pool = encoder, global_pool
        self.depth = len(encoder.blocks)
        dim = encoder.cls_token.shape[-1]
        if global_pool:
            encoder.norm = nn.Identity()  # MAE fine-tuning: fc_norm on the pooled tokens replaces the final norm
            self.fc_norm = LayerNorm(dim)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as IATClassifier: logits start near zero
        nn.init.zeros_(self.head.bias)
        if drop_path > 0:
            set_drop_path(encoder.blocks, drop_path)

    def forward(self, batch: dict) -> torch.Tensor:
        tokens = self.encoder.run_blocks(self.encoder.embed(batch["x"]))
        feats = tokens[:, 1:].mean(1) if self.global_pool else tokens[:, 0]
        return self.head(self.fc_norm(feats))

    def layer_id(self, name: str) -> int:
        return vit_layer_id(name, self.depth)


class FeatureClassifier(nn.Module):
    """Any model (copied by the caller): `model.encode(batch)` flattened + LayerNorm + linear head."""

    depth = 0  # no blocks: one layer, so every parameter gets layer_decay ** 0 = 1

    def __init__(self, model: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.model = model
        self.fc_norm = LayerNorm(feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.fc_norm(self.model.encode(batch).float().flatten(1)))

    def layer_id(self, name: str) -> int:
        return self.depth + 1


def set_drop_path(blocks: nn.ModuleList, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to `rate` over the blocks (timm blocks: drop_path1/2)."""
    missing = [i for i, b in enumerate(blocks) if not (hasattr(b, "drop_path1") and hasattr(b, "drop_path2"))]
    if missing:
        raise ValueError(
            f"drop_path={rate}: blocks {missing} ({type(blocks[missing[0]]).__name__}) have no drop_path1/2 "
            f"slots; set eval.evaluators.finetune.drop_path=0"
        )
    for block, r in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


def build_classifier(model: nn.Module, num_classes: int, example: dict, global_pool: bool = True,
                     drop_path: float = 0.0) -> nn.Module:
    """The network to fine-tune, built from deep copies: `model` itself is left untouched."""
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and is_vit_encoder(encoder):
        net = ViTClassifier(copy.deepcopy(encoder), num_classes, global_pool, drop_path)
    else:
        body = copy.deepcopy(model)
        with torch.no_grad():
            dim = body.encode(example).flatten(1).shape[1]
        net = FeatureClassifier(body, dim, num_classes)
    for m in net.modules():
        # model.compile() wraps the original module's call; a copy must not route through it
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    for p in net.parameters():
        p.requires_grad_(True)  # a frozen part of the pretrained model (e.g. a teacher) trains here too
    return net


class ShardedRandomSampler(torch.utils.data.Sampler):
    """A fresh permutation of range(n) each epoch from `generator` (seeded alike on every rank); rank r
    yields positions r, r + world, r + 2·world, … of it, n // world of them on every rank. With one rank
    this is SubsetRandomSampler(range(n)) drawing from the same generator."""

    def __init__(self, n: int, rank: int, world: int, generator: torch.Generator):
        self.n, self.rank, self.world, self.generator = n, rank, world, generator
        self.per_rank = n // world

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator)
        return iter(perm[self.rank : self.per_rank * self.world : self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def param_groups(net: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay (`layer_decay_groups`); no weight decay on biases, 1-D
    parameters (norms) and tokens."""
    return layer_decay_groups(net, lr, weight_decay, layer_decay, lambda name, p: (
        p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES))


class MixupCutmix:
    """Batch-level mixup / cutmix with label smoothing, returning (mixed x, soft targets).

    One λ per batch. With both alphas > 0 a batch uses cutmix with probability `switch_prob`, else mixup;
    the batch is mixed with itself reversed. Mixup: λ ~ Beta(α, α), x = λx + (1−λ)x_rev. Cutmix:
    λ ~ Beta(α, α), a box of relative side √(1−λ) at a uniform centre (clipped to the image) is pasted
    from x_rev and λ is recomputed from the clipped box area. Targets: λ·smooth(y) + (1−λ)·smooth(y_rev),
    smooth(y) = (1−ε)·onehot + ε/K (F.cross_entropy's label_smoothing). Cutmix needs (B, C, H, W)
    inputs; other shapes only mix up."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0):
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, label_smoothing
        self.rng = np.random.default_rng(seed)
        self.last_lam = 1.0  # for tests / logging

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        t = torch.full((len(y), self.num_classes), off, device=y.device)
        return t.scatter_(1, y.view(-1, 1), 1.0 - self.smoothing + off)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.targets(y)
        use_cutmix = self.cutmix > 0 and x.ndim == 4
        active = (self.mixup > 0 or use_cutmix) and len(x) > 1 and self.rng.random() < self.prob
        if not active:
            self.last_lam = 1.0
            return x, t
        if use_cutmix and (self.mixup <= 0 or self.rng.random() < self.switch_prob):
            lam = float(self.rng.beta(self.cutmix, self.cutmix))
            h, w = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            lam = float(self.rng.beta(self.mixup, self.mixup))
            x = x * lam + x.flip(0) * (1.0 - lam)
        self.last_lam = lam
        return x, t * lam + t.flip(0) * (1.0 - lam)


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize, also for 0 bits (level 10 of the "inc" op set): an all-black image, as Pillow used to
    return; the Pillow installed here raises on 0 instead."""
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - bits_to_keep) - 1) & 0xFF
    return img.point(lambda v: v & mask)


class RandAugmented(torch.utils.data.Dataset):
    """A map-style image dataset whose uint8 images pass timm's RandAugment (`spec`, e.g. the MAE recipe's
    "rand-m9-mstd0.5-inc1") as PIL images, per image, inside the loader workers (as timm's create_transform
    does). Batched datasets (`__getitems__`) stay batched."""

    def __init__(self, dataset, spec: str, mean: torch.Tensor, image_size: int):
        from PIL import Image
        from timm.data.auto_augment import rand_augment_transform

        item = dataset[0]
        x = item.get("x") if isinstance(item, dict) else None
        if x is None or x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] not in (1, 3):
            what = "JPEG bytes decoded on the device (data.decode_on_device=true)" if "jpeg" in item else (
                f"{x.dtype} {tuple(x.shape)}" if x is not None else f"items with keys {sorted(item)}")
            raise ValueError(
                f"finetune.rand_augment needs uint8 (1 or 3, H, W) images in the loader; this data gives {what}. "
                f"Set eval.evaluators.finetune.rand_augment=null"
            )
        fill = tuple(min(255, round(255 * float(m))) for m in mean.view(-1))  # timm: fill with the data mean
        self.dataset = dataset
        self.transform = rand_augment_transform(spec, {
            "translate_const": int(image_size * 0.45), "img_mean": fill, "interpolation": Image.BICUBIC})
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def __len__(self) -> int:
        return len(self.dataset)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        img = Image.fromarray(x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy())
        out = torch.from_numpy(np.array(self.transform(img), dtype=np.uint8))
        return out.unsqueeze(0) if out.ndim == 2 else out.permute(2, 0, 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[i])
        item["x"] = self.augment(item["x"])
        return item

    def __getitems__(self, idx: list[int]):
        if not hasattr(self.dataset, "__getitems__"):
            return [self[i] for i in idx]
        batch = dict(self.dataset.__getitems__(idx))
        batch["x"] = torch.stack([self.augment(x) for x in batch["x"]])
        return batch


def random_erasing(x: torch.Tensor, prob: float, attempts: int = 10) -> torch.Tensor:
    """RandomErasing in timm's pixel mode with one box, per sample, on a normalised batch (B, C, H, W): with
    probability `prob` a box of area U(0.02, 1/3) of the image and aspect log-U(0.3, 1/0.3) (the first of
    `attempts` draws that fits) is filled with N(0, 1) noise."""
    if prob <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, attempts, device=dev).uniform_(0.02, 1 / 3) * (h * w)
    aspect = torch.empty(b, attempts, device=dev).uniform_(math.log(0.3), math.log(1 / 0.3)).exp()
    eh, ew = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(1, keepdim=True)
    eh, ew = eh.gather(1, first).view(b, 1, 1), ew.gather(1, first).view(b, 1, 1)
    top = (torch.rand(b, 1, 1, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, 1, 1, device=dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    erase = fits.any(1) & (torch.rand(b, device=dev) < prob)
    box = (box & erase.view(b, 1, 1)).unsqueeze(1)
    return torch.where(box, torch.randn_like(x), x)


class FineTune:
    """Evaluator: fine-tune a copy of the encoder end to end, return {"top1", "top5" (≥ 5 classes),
    "train_loss" (last epoch), "lr" (absolute base lr)}. Defaults: the MAE ViT-B recipe (eval/finetune.yaml).

    Uses ctx.max_samples as a cap on the train images (the first n) and on the val images. Augmentation:
    the DataModule's own random-resized-crop / flip (in its workers or on the device), `rand_augment` (timm
    RandAugment in the loader workers), then on the device `reprob` random erasing and mixup / cutmix."""

    distributed = True  # runs on every rank of a torchrun launch (see the module docstring)

    def __init__(
        self,
        epochs: int = 100,
        blr: float | None = 5e-4,
        lr: float | None = None,
        batch_size: int | None = None,
        layer_decay: float = 0.65,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        drop_path: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        global_pool: bool = True,
        amp: bool = True,
        seed: int = 0,
    ):
        if (lr is None) == (blr is None):
            raise ValueError("finetune: set exactly one of lr (absolute) and blr (lr = blr * batch_size / 256)")
        if epochs < 1:
            raise ValueError(f"finetune: epochs must be >= 1, got {epochs}")
        self.epochs, self.blr, self.lr, self.batch_size = epochs, blr, lr, batch_size
        self.layer_decay, self.weight_decay, self.betas = layer_decay, weight_decay, tuple(betas)
        self.warmup_epochs, self.min_lr, self.label_smoothing = warmup_epochs, min_lr, label_smoothing
        self.drop_path, self.mixup, self.cutmix = drop_path, mixup, cutmix
        self.mixup_prob, self.mixup_switch_prob = mixup_prob, mixup_switch_prob
        if not 0 <= reprob <= 1:
            raise ValueError(f"finetune: reprob must be in [0, 1], got {reprob}")
        self.rand_augment, self.reprob = rand_augment or None, reprob
        self.global_pool, self.amp, self.seed = global_pool, amp, seed

    # -- data -----------------------------------------------------------------------------------------
    def train_loader(self, ctx, batch_size: int, generator: torch.Generator):
        """Shuffled each epoch over the first max_samples train images (with the DataModule's training
        transforms, + RandAugment), in the DataModule's batch format; this rank's share of it."""
        dm = ctx.datamodule
        base = dm.eval_dataloader("train", batch_size)
        ds = getattr(dm, "train_set", None)
        rank, world = ctx.rank, ctx.world
        if ds is None or isinstance(ds, torch.utils.data.IterableDataset):
            if self.rand_augment:
                raise ValueError("finetune.rand_augment is not implemented for streamed data (data.streaming=true): "
                                 "set eval.evaluators.finetune.rand_augment=null")
            if world > 1:
                raise ValueError(f"finetune on {world} processes needs a map-style train set to shard; streamed "
                                 f"data (data.streaming=true) runs in one process")
            return base  # a stream has no random access: its own order, cut at max_samples by the caller
        if self.rand_augment:
            ds = RandAugmented(ds, self.rand_augment, dm.mean, int(dm.input_shape[-1]))
        n = len(ds) if ctx.max_samples is None else min(len(ds), ctx.max_samples)
        sampler = ShardedRandomSampler(n, rank, world, generator)
        return torch.utils.data.DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            # a constant batch for the lr rule; keep the tail of tiny sets
            drop_last=len(sampler) >= 2 * batch_size,
            num_workers=base.num_workers,
            collate_fn=base.collate_fn,
        )

    # -- the protocol ---------------------------------------------------------------------------------
    def __call__(self, ctx) -> dict[str, float]:
        dm = ctx.datamodule
        num_classes = getattr(dm, "num_classes", None)
        if not num_classes:
            return skipped("finetune", "the data has no labels (datamodule.num_classes is unset)")
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        # the caller's RNG streams stay as they were; timm's RandAugment draws from `random` and numpy
        py_state, np_state = random.getstate(), np.random.get_state()
        seed = self.seed + ctx.rank  # augmentation differs between ranks (the data order does not)
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                return self._run(ctx, int(num_classes))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _run(self, ctx, num_classes: int) -> dict[str, float]:
        dm, device = ctx.datamodule, ctx.device
        rank, world = ctx.rank, ctx.world
        batch_size = self.batch_size or getattr(dm, "batch_size", None) or ctx.batch_size  # per process
        loader = self.train_loader(ctx, batch_size, torch.Generator().manual_seed(self.seed))
        steps_per_epoch = len(loader)
        if ctx.max_samples is not None and isinstance(loader.dataset, torch.utils.data.IterableDataset):
            steps_per_epoch = min(steps_per_epoch, max(ctx.max_samples // batch_size, 1))
        epochs = ctx.epochs(self.epochs)
        total = epochs * steps_per_epoch
        warmup = int(self.warmup_epochs * steps_per_epoch)
        lr = self.lr if self.lr is not None else self.blr * batch_size * world / 256

        batches = ctx.batches("train", "finetune (shape)")
        example = next(batches)  # one batch to size the head of a non-ViT encoder
        batches.close()
        net = build_classifier(ctx.model, num_classes, example, self.global_pool, self.drop_path).to(device)
        groups = param_groups(net, lr, self.weight_decay, self.layer_decay)
        opt = torch.optim.AdamW(groups, lr=lr, betas=self.betas)
        mix = MixupCutmix(num_classes, self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob,
                          self.label_smoothing, self.seed + rank)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp and device.type == "cuda")
        if rank == 0:
            log.info("finetune: %s, %d epochs x %d steps, batch %d x %d processes, lr %.3g, layer decay %.3g over "
                     "%d blocks", type(net).__name__, epochs, steps_per_epoch, batch_size, world, lr,
                     self.layer_decay, net.depth)
        trained = net
        if world > 1:  # rank 0's initial weights are broadcast; gradients are averaged over the ranks
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=isinstance(net, FeatureClassifier),  # e.g. a decoder encode() skips
            )

        step, t0, epoch_loss = 0, time.time(), float("nan")
        bar = tqdm(total=total, desc="finetune", disable=None if rank == 0 else True)
        net.train()
        for epoch in range(epochs):
            loss_sum, n_steps = torch.zeros((), device=device), 0
            for i, batch in enumerate(loader):
                if i >= steps_per_epoch:
                    break
                mult = warmup_cosine(step, warmup, total, lr, self.min_lr, cosine=True)
                for g in opt.param_groups:
                    g["lr"] = g["lr_scale"] * lr * mult
                batch = ctx.device_batch(batch, augment=True)
                x = random_erasing(batch["x"], self.reprob) if batch["x"].ndim == 4 else batch["x"]
                x, target = mix(x, batch["y"])
                with autocast:
                    logits = net({**batch, "x": x})
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                n_steps += 1
                step += 1
                bar.update(1)
            if world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= world
            epoch_loss = (loss_sum / max(n_steps, 1)).item()  # one host sync per epoch
            if not math.isfinite(epoch_loss):
                bar.close()
                raise RuntimeError(f"finetune: non-finite training loss in epoch {epoch}; lower the lr (blr={self.blr}"
                                   f", lr={self.lr})")
            bar.set_postfix(loss=f"{epoch_loss:.4f}", epoch=epoch + 1)
            if rank == 0:
                log.info("finetune epoch %d/%d: loss %.4f", epoch + 1, epochs, epoch_loss)
        bar.close()

        net = trained.eval()
        correct1 = correct5 = n = 0
        with torch.no_grad(), autocast:
            for batch in ctx.batches("val", "finetune (val)"):
                logits = net(batch).float()
                y = batch["y"]
                top = logits.topk(min(5, num_classes), dim=1).indices
                correct1 += (top[:, 0] == y).sum().item()
                correct5 += (top == y[:, None]).any(1).sum().item()
                n += len(y)
        out = {"top1": correct1 / max(n, 1), "train_loss": epoch_loss, "lr": lr}
        if num_classes >= 5:
            out["top5"] = correct5 / max(n, 1)
        if rank == 0:
            log.info("finetune: top1 %.4f on %d val images after %d steps (%.0f s)", out["top1"], n, step,
                     time.time() - t0)
        return out
