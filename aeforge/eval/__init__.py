"""Evaluation after fit: evaluators run on frozen features / reconstructions and return flat metrics.

`Evaluation` extracts what evaluators ask for once (features of the train and val splits, with labels)
and hands each evaluator an `EvalContext`. Families swap evaluators through the `eval` config group."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from tqdm.auto import tqdm

from aeforge.config import ConfigError


@dataclass
class EvalContext:
    model: torch.nn.Module
    datamodule: object
    device: torch.device
    batch_size: int
    max_samples: int | None
    # a cap on the epochs of the evaluators that train (linear probe, fine-tuning, ...); debug=smoke sets it
    max_epochs: int | None = None
    cache: dict = field(default_factory=dict)
    # this process and the process count when every rank evaluates together (torchrun scripts/evaluate.py);
    # 0 / 1 otherwise, also on rank 0 after a DDP fit, where the other ranks have left
    rank: int = 0
    world: int = 1

    def batches(self, split: str, desc: str):
        """Normalised, un-augmented batches of `split` on the device, up to max_samples."""
        seen = 0
        loader = self.datamodule.eval_dataloader(split, self.batch_size)
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            if self.max_samples is not None and seen >= self.max_samples:
                break
            batch = self.device_batch(batch)
            seen += len(batch["x"])
            yield batch

    def device_batch(self, batch: dict, augment: bool = False) -> dict[str, torch.Tensor]:
        """A loader batch on the device, normalised (image DataModules also decode device-side JPEGs)."""
        prepare = getattr(self.datamodule, "device_batch", None)
        if prepare is not None:
            return prepare(batch, self.device, augment)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["x"] = self.datamodule.normalize(batch["x"], augment=augment)
        return batch

    @torch.no_grad()
    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if split not in self.cache:
            feats, labels = [], []
            for batch in self.batches(split, f"features ({split})"):
                feats.append(self.model.encode(batch).float().flatten(1).cpu())
                if "y" in batch:
                    labels.append(batch["y"].cpu())
            self.cache[split] = (torch.cat(feats), torch.cat(labels) if labels else None)
        return self.cache[split]

    def epochs(self, configured: int) -> int:
        """An evaluator's configured epoch count under eval.max_epochs."""
        return configured if self.max_epochs is None else min(configured, self.max_epochs)

    @cached_property
    def has_labels(self) -> bool:
        return self.features("train")[1] is not None


class Evaluation:
    def __init__(self, evaluators: dict, max_samples: int | None = None, batch_size: int = 256,
                 max_epochs: int | None = None):
        if max_epochs is not None and max_epochs < 1:
            raise ConfigError(f"eval.max_epochs must be >= 1 or null, got {max_epochs}")
        self.evaluators, self.max_samples, self.batch_size = evaluators, max_samples, batch_size
        self.max_epochs = max_epochs

    def __call__(self, model: torch.nn.Module, datamodule, device: torch.device,
                 sharded: bool = False) -> dict[str, float]:
        """sharded: every rank of the default process group calls this together (evaluators that declare
        `distributed = True` split their work over the ranks; the others are refused)."""
        if not self.evaluators:
            return {}
        rank, world = 0, 1
        if sharded:
            single = [name for name, e in self.evaluators.items() if not getattr(e, "distributed", False)]
            if single:
                raise ConfigError(f"eval: {single} run in one process; under torchrun only evaluators that shard "
                                  f"over processes run (finetune: eval=finetune). Launch the others without torchrun")
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        was_training = model.training
        model.eval().to(device)
        ctx = EvalContext(model, datamodule, device, self.batch_size, self.max_samples, self.max_epochs, rank=rank,
                          world=world)
        metrics: dict[str, float] = {}
        try:
            for name, evaluator in self.evaluators.items():
                for k, v in evaluator(ctx).items():
                    metrics[f"{name}/{k}"] = float(v)
        finally:
            model.train(was_training)
        return metrics
