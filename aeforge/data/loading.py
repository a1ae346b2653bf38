"""Resumable, rank-sharded data loading shared by every DataModule.

`ResumableLoader` is a DataLoader whose order is a pure function of (seed, epoch, rank) and which
implements `state_dict`/`load_state_dict`, so Lightning resumes a run mid-epoch at the exact batch.
It shards by rank itself (aeforge turns off Lightning's sampler replacement)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedSampler(Sampler[int]):
    """Shuffled (or ordered) indices for this rank, padded so every rank has the same count."""

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch, self.start = 0, 0
        self.rank, self.world = _rank_world()

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world
        order += order[: total - len(order)]
        return order[self.rank : total : self.world]

    def __iter__(self):
        idx = self.indices()[self.start :]
        self.start = 0
        return iter(idx)


def _identity(batch):
    return batch


class ResumableLoader(DataLoader):
    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, **kwargs):
        self.sampler_ = ShardedSampler(len(dataset), shuffle, seed)
        batched = hasattr(dataset, "__getitems__")
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler_,
            drop_last=shuffle,
            collate_fn=_identity if batched else None,
            # own generator: creating an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        self._yielded = 0
        self._epoch_started = False

    def __iter__(self):
        if self._epoch_started:  # a new epoch begins only once the previous one was iterated
            self.sampler_.epoch += 1
            self._yielded = 0
        self._epoch_started = True
        self.sampler_.start = self._yielded * self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler_.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self.sampler_.epoch, self._yielded = state["epoch"], state["batches"]
        if self._yielded >= len(self):  # saved at the end of an epoch: the next one starts fresh
            self.sampler_.epoch, self._yielded = self.sampler_.epoch + 1, 0
        self._epoch_started = False
