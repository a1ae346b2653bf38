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
        # every DataModule wants these two: page-locked batches for the GPU copy, workers kept across epochs
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        kwargs.setdefault("persistent_workers", kwargs.get("num_workers", 0) > 0)
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

    def end_epoch(self) -> None:
        """The restored epoch is over although the loader was not exhausted (trainer.limit_train_batches): the
        next iteration starts the next epoch. A no-op when load_state_dict already moved on."""
        if self._yielded:
            self._epoch_started = True


class StreamLoader(DataLoader):
    """The streamed counterpart of ResumableLoader: a DataLoader over an iterable dataset whose order is a
    pure function of (seed, epoch, rank, worker), with `state_dict`/`load_state_dict` for mid-epoch resume.

    Every item names its worker ("worker") and flags the worker's last row ("last"; a worker left with no
    rows sends one "empty" item). The loader counts batches per worker, so a resumed epoch tells each
    worker how many rows it already delivered (`dataset.skip`, dropped before decoding), and it yields
    batches in the order an uninterrupted run would: round-robin over the workers still running, starting
    at the worker whose turn was next (a fresh DataLoader always starts at worker 0, so up to W - 1
    batches wait in a small buffer). Workers are not persistent: they must restart to see the new epoch
    and skip counts.

    With several ranks, every rank must run the same number of steps or DDP hangs at the epoch's end,
    but streamed ranks (and each worker's final partial batch) differ by a few batches: each rank stops
    after `len(self)` = ⌈rows / world / batch⌉ − max(W, 1) batches (needs the split's size); the rows
    past that are left out of this epoch (a different tail each epoch, as the shuffle changes)."""

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, **kwargs):
        kwargs.pop("persistent_workers", None)
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
        self._per_worker: dict[int, int] = {}
        self._next = 0
        self._epoch_started = self._finished = False

    def __len__(self) -> int:
        n = super().__len__()
        return max(1, n - max(self.num_workers, 1)) if _rank_world()[1] > 1 else n

    def _cap(self) -> int | None:
        if _rank_world()[1] == 1:
            return None
        try:
            return len(self)
        except TypeError:
            raise ValueError("streaming on several ranks needs the train split's size (data.train_rows) so that "
                             "every rank runs the same number of steps") from None

    def __iter__(self):
        ds, cap = self.dataset, self._cap()
        if self._epoch_started:
            ds.epoch += 1
            self._per_worker, self._next = {}, 0
        self._epoch_started, self._finished = True, False
        if cap is None:
            yield from self._ordered()
            return
        remaining = cap - sum(self._per_worker.values())  # a resumed epoch has delivered some already
        for i, batch in enumerate(self._ordered() if remaining > 0 else ()):
            yield batch
            if i + 1 >= remaining:
                break
        self._finished = True

    def _ordered(self):
        ds = self.dataset
        ds.skip = {w: n * self.batch_size for w, n in self._per_worker.items()}
        active = list(range(max(self.num_workers, 1)))
        queues: dict[int, list] = {w: [] for w in active}
        for batch in super().__iter__():
            queues[int(batch["worker"][0])].append(batch)
            while active and queues[self._next]:
                yield from self._release(queues, active)
        while active:  # the loader is done; whatever is left goes out in turn order
            if not queues[self._next]:
                active.remove(self._next)
                self._next = active[0] if active else 0
                continue
            yield from self._release(queues, active)
        self._finished = True

    def _release(self, queues: dict[int, list], active: list[int]):
        worker = self._next
        batch = queues[worker].pop(0)
        later = [w for w in active if w > worker] or active
        if bool(batch.pop("last").any()):
            active.remove(worker)
        self._next = later[0] if later and later[0] in active else (active[0] if active else 0)
        if not bool(batch.pop("empty").any()):
            batch.pop("worker")
            self._per_worker[worker] = self._per_worker.get(worker, 0) + 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "per_worker": dict(self._per_worker), "next": self._next,
                "finished": self._finished}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.epoch, self._next = state["epoch"], state["next"]
        self._per_worker = {int(w): n for w, n in state["per_worker"].items()}
        if state.get("finished"):  # saved at the end of an epoch: the next one starts fresh
            self.dataset.epoch, self._per_worker, self._next = self.dataset.epoch + 1, {}, 0
        self._epoch_started = False

    def end_epoch(self) -> None:
        """As ResumableLoader.end_epoch: the restored epoch is over; the next iteration starts the next one."""
        if self._per_worker:
            self._epoch_started = True
