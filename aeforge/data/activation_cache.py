"""The activation cache: `write_cache` stores activations once (scripts/cache_activations.py),
`CachedActivationStream` reads them back for training.

Layout: per shard `<cache_dir>/shard_<i>.npy` (tokens, S, d), memory-mapped on read; `val.npy` (held-out
tokens); a `manifest.json` updated after every shard (written to a temp file then renamed), so an interrupted
write resumes at the first missing shard. Reading keeps at most `buffer_shards` shards in RAM, shuffles
tokens across them and resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aeforge.data.activation_streams import ResumableStream
from aeforge.data.lm import lm_activations
from aeforge.data.loading import _rank_world

if TYPE_CHECKING:
    from aeforge.data.activations import ActivationDataModule


def cache_key(dm: ActivationDataModule) -> str:
    """What the cached activations depend on, hashed: a cache of other settings is refused."""
    spec = {
        "lm": dm.lm_name,
        "patterns": dm.patterns,
        "text": dm.text,
        "ctx_len": dm.ctx_len,
        "packing": dm.packing,
        "chat": dm.chat,
        "max_docs": dm.max_docs,
        "lm_seed": dm.lm_seed,
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def write_cache(
    dm: ActivationDataModule,
    cache_dir: str | Path,
    shard_sequences: int = 256,
    dtype: str = "float32",
    max_shards: int | None = None,
) -> dict:
    """Write every training sequence's activations as shards of `shard_sequences` sequences; resumable:
    shards are renamed into place when complete and recorded in manifest.json, and a rerun with the same
    settings starts at the first missing shard. `max_shards` stops early (tests, interruption)."""
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    key = cache_key(dm)
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else None
    if manifest is not None and manifest.get("key") != key:
        raise RuntimeError(
            f"{out} holds a cache of other settings (key {manifest.get('key')} != {key}); "
            f"use another cache_dir"
        )
    if manifest is None:
        manifest = {
            "key": key,
            "lm": dm.lm_name,
            "patterns": dm.patterns,
            "hookpoints": dm.hookpoint_names,
            "d": dm.input_shape[1],
            "text": dm.text,
            "ctx_len": dm.ctx_len,
            "packing": dm.packing,
            "chat": dm.chat,
            "text_field": dm.text_field,
            "sample_by": dm.sample_by,
            "max_docs": dm.max_docs,
            "dtype": dtype,
            "shard_sequences": shard_sequences,
            "shards": [],
            "complete": False,
        }
    n_seq = len(dm.train_ids)
    n_shards = math.ceil(n_seq / shard_sequences)
    written = 0
    np_dtype = np.dtype(dtype)

    def save_manifest():
        tmp = mpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, mpath)

    if not (out / "val.npy").is_file():
        np.save(out / "val.tmp.npy", dm.val_activations().numpy().astype(np_dtype))
        os.replace(out / "val.tmp.npy", out / "val.npy")
    manifest["val_file"] = "val.npy"
    for i in range(len(manifest["shards"]), n_shards):
        if max_shards is not None and written >= max_shards:
            save_manifest()
            return manifest
        s = i * shard_sequences
        xs = []
        for j in range(s, min(s + shard_sequences, n_seq), dm.lm_batch_size):
            e = min(j + dm.lm_batch_size, s + shard_sequences, n_seq)
            x, _ = lm_activations(dm.lm, dm.hooks, dm.train_ids[j:e].to(dm.device), dm.train_mask[j:e].to(dm.device),
                                  drop_token_id=dm.drop_token_id)
            xs.append(x.cpu().numpy().astype(np_dtype))
        arr = np.concatenate(xs)
        name = f"shard_{i:05d}.npy"
        np.save(out / f"shard_{i:05d}.tmp.npy", arr)
        os.replace(out / f"shard_{i:05d}.tmp.npy", out / name)
        manifest["shards"].append(
            {"file": name, "tokens": int(len(arr)), "sequences": [s, min(s + shard_sequences, n_seq)]}
        )
        save_manifest()
        written += 1
    manifest["complete"] = True
    save_manifest()
    return manifest


class CachedActivationStream(ResumableStream):
    """Shards in a seeded order per epoch, `buffer_shards` at a time (bounded RAM); tokens shuffled within
    the window; every rank reads the same window rows strided by rank, so ranks get equal batch counts."""

    def __init__(self, dm: ActivationDataModule, batch_size: int):
        super().__init__(dm.seed)
        self.dm, self.batch_size = dm, batch_size
        self.shards = dm.manifest["shards"]

    def _windows(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        n = len(self.shards)
        order = torch.randperm(n, generator=g).tolist() if self.dm.shuffle_sequences else list(range(n))
        w = max(self.dm.buffer_shards, 1)
        return [order[i : i + w] for i in range(0, n, w)]

    def _per_window(self, window: list[int]) -> int:
        world = _rank_world()[1]
        tokens = sum(self.shards[i]["tokens"] for i in window)
        return (tokens // world) // self.batch_size

    def __len__(self) -> int:
        return max(sum(self._per_window(w) for w in self._windows(0)), 1)

    def __iter__(self):
        skip = self._begin()
        rank, world = _rank_world()
        made = 0
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        for window in self._windows(self.epoch):
            nb = self._per_window(window)
            if made + nb <= skip:  # the whole window was consumed before the interruption
                made += nb
                continue
            arrays = [np.load(self.dm.cache_path / self.shards[i]["file"], mmap_mode="r") for i in window]
            x = torch.from_numpy(np.concatenate([np.asarray(a) for a in arrays]))
            perm = torch.randperm(len(x), generator=g) if self.dm.buffer_shards > 0 else torch.arange(len(x))
            mine = perm[rank::world]
            for b in range(nb):
                if made >= skip:
                    self.batches = made + 1
                    yield {"x": x[mine[b * self.batch_size : (b + 1) * self.batch_size]].float()}
                made += 1
