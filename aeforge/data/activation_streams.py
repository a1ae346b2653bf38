"""Batches of activations: the resumable on-the-fly stream (LM run inside the loader), held-out tensors, and
the wrapper Lightning saves the loader position through. The cache reader is in activation_cache.py."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from aeforge.data.loading import _rank_world

if TYPE_CHECKING:
    from aeforge.data.activations import ActivationDataModule


class StatefulLoader:
    """A resumable iterable of batches (Lightning saves `state_dict` with the loop and restores it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def end_epoch(self) -> None:
        self.dataset.end_epoch()


class ResumableStream:
    """Shared epoch/position bookkeeping: the order is a function of (seed, epoch); `batches` counts
    what was yielded in the current epoch, and a restored position is skipped on the next iteration."""

    def __init__(self, seed: int):
        self.seed, self.epoch, self.batches, self._started = seed, 0, 0, False

    def _begin(self) -> int:
        if self._started:
            self.epoch += 1
            self.batches = 0
        self._started = True
        return self.batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        if self.batches >= len(self):
            self.epoch, self.batches = self.epoch + 1, 0
        self._started = False

    def end_epoch(self) -> None:
        """The restored epoch is over (the trainer cut it short): the next iteration starts the next epoch."""
        if self.batches:
            self._started = True


class LMActivationStream(ResumableStream):
    """On the fly: sequences (rank-sharded, reshuffled per epoch unless sequential) → LM → mixing buffer
    of `buffer_tokens` (filled, shuffled, the first half consumed, refilled; 0 = no token shuffling)."""

    def __init__(self, dm: ActivationDataModule, batch_size: int):
        super().__init__(dm.seed)
        self.dm, self.batch_size = dm, batch_size

    def __len__(self) -> int:
        return max(self.dm.num_tokens // (self.batch_size * _rank_world()[1]), 1)

    def __iter__(self):
        skip = self._begin()
        dm, bs = self.dm, self.batch_size
        rank, world = _rank_world()
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        n_seq = len(dm.train_ids)
        cap = max(dm.buffer_tokens, bs)
        buf_x: list[torch.Tensor] = []
        buf_g: list[torch.Tensor] = []
        have, made, cycle = 0, 0, 0
        total = len(self)

        def sequences():
            nonlocal cycle
            while True:
                order = torch.randperm(n_seq, generator=g) if dm.shuffle_sequences else torch.arange(n_seq)
                order = order[rank::world]
                for s in range(0, len(order), dm.lm_batch_size):
                    yield order[s : s + dm.lm_batch_size]
                cycle += 1

        seqs = sequences()
        pending_x = pending_g = None
        while made < total:
            while have < cap:
                idx = next(seqs)
                x, gr = dm.activations_for(dm.train_ids[idx], dm.train_mask[idx])
                buf_x.append(x)
                if gr is not None:
                    buf_g.append(gr)
                have += len(x)
            x = torch.cat(buf_x if pending_x is None else [pending_x, *buf_x])
            gr = torch.cat(buf_g if pending_g is None else [pending_g, *buf_g]) if buf_g else None
            buf_x, buf_g = [], []
            if dm.buffer_tokens > 0:
                perm = torch.randperm(len(x), generator=g).to(x.device)
                x = x[perm]
                gr = gr[perm] if gr is not None else None
            n_out = max((len(x) // 2) // bs, 1) if dm.buffer_tokens > 0 else len(x) // bs
            for b in range(n_out):
                if made >= total:
                    return
                if made >= skip:
                    batch = {"x": x[b * bs : (b + 1) * bs]}
                    if gr is not None:
                        batch["grad"] = gr[b * bs : (b + 1) * bs]
                    self.batches = made + 1
                    yield batch
                made += 1
            pending_x = x[n_out * bs :]
            pending_g = gr[n_out * bs :] if gr is not None else None
            have = len(pending_x)


class TensorBatches:
    """Fixed tensors (held-out activations) in batches of `batch_size` rows, in order."""

    def __init__(self, x: torch.Tensor, batch_size: int):
        self.x, self.bs = x, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.bs)

    def __iter__(self):
        for i in range(0, len(self.x), self.bs):
            yield {"x": self.x[i : i + self.bs]}
