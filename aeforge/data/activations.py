"""Language-model activations for sparse autoencoders (`modality = "activations"`): the DataModule.

Pipeline: text (local txt/jsonl/json/parquet through HF `datasets`, or a hub dataset name; lm_text.py) →
documents (plain text, or chat-formatted instances for instruct data) → token sequences (`packing: block` or
`per_instance`) → the LM (lm.py: any HF AutoModelForCausalLM / AutoModel, or a built-in randomly initialised
`tiny-gpt2` / `tiny-llama`) → activations at the hookpoints → a mixing buffer (activation_streams.py) →
batches `x: (B, S, d)` (S hookpoints of width d; pad positions dropped).

Modes (`source`): `lm` runs the LM on the fly inside the loader (needed for g-SAE gradients, `with_grad`);
`cache` reads activation shards written once by `scripts/cache_activations.py` (activation_cache.py).

`normalize` multiplies by a per-site constant (`scaling: unit_sqrt_d` makes E‖x‖ = √d on the val
tokens, the Anthropic / Gemma Scope convention; `none` returns activations unchanged); per-token layer
norm is an SAE option (`model.input_norm: layernorm`) because it must be undone per token for splicing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from aeforge.data.activation_cache import CachedActivationStream
from aeforge.data.activation_streams import LMActivationStream, StatefulLoader, TensorBatches
from aeforge.data.lm import Hookpoint, lm_activations, load_lm, resolve_hookpoints
from aeforge.data.lm_text import default_text, load_documents, synthetic_documents, tokenize_sequences


class ActivationDataModule(pl.LightningDataModule):
    modality = "activations"

    def __init__(
        self,
        lm: str | None = "tiny-gpt2",
        hookpoints: list[str] | None = None,
        text: str | None = None,
        text_field: str = "text",
        sample_by: str = "paragraph",
        chat: bool = False,
        packing: str = "block",
        ctx_len: int = 128,
        max_docs: int | None = None,
        source: str = "lm",
        cache_dir: str | None = None,
        batch_size: int = 4096,
        lm_batch_size: int = 32,
        num_tokens: int = 2_000_000,
        buffer_tokens: int = 65536,
        buffer_shards: int = 4,
        shuffle_sequences: bool = True,
        val_fraction: float = 0.05,
        val_tokens: int = 16384,
        with_grad: bool = False,
        scaling: str = "none",
        lm_dtype: str = "float32",
        lm_seed: int = 0,
        gguf_file: str | None = None,
        exclude_bos: bool = True,
        device: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """lm: `tiny-gpt2` / `tiny-llama` (random, offline), `minilm` (pip package), or any HF name/path.
        text: file/folder/hub dataset; null = the Tiny Shakespeare file of $AEFORGE_DATA_DIR.
        source: lm (on the fly) | cache (shards in cache_dir). num_tokens: training tokens per epoch
        (on the fly). device: where the LM runs (null: cuda if available). num_workers is accepted for
        the smoke settings; activations are produced in the main process (the LM is on the device).
        exclude_bos: leave BOS positions out of the activations (train, val, cache) and of the CE
        splicing (the attention-sink token: on Gemma 3 270M its layer-6 residual norm is ~17x a typical
        token's, docs/methods/sae.md)."""
        super().__init__()
        if source not in ("lm", "cache"):
            raise ValueError(f"data.source={source!r}; valid: ['cache', 'lm']")
        if scaling not in ("none", "unit_sqrt_d"):
            raise ValueError(f"data.scaling={scaling!r}; valid: ['none', 'unit_sqrt_d']")
        if sample_by not in ("line", "paragraph", "document"):  # else `datasets` fails with a generation error
            raise ValueError(f"data.sample_by={sample_by!r}; valid: ['document', 'line', 'paragraph']")
        if lm_dtype not in ("float32", "float16", "bfloat16", "float64"):  # else getattr(torch, ...) fails later
            raise ValueError(f"data.lm_dtype={lm_dtype!r}; valid: ['bfloat16', 'float16', 'float32', 'float64']")
        self.lm_name, self.patterns = lm, list(hookpoints or ["layers.0.residual"])
        self.text, self.text_field, self.sample_by, self.chat = text, text_field, sample_by, chat
        self.packing, self.ctx_len, self.max_docs = packing, ctx_len, max_docs
        self.source, self.batch_size, self.lm_batch_size = source, batch_size, lm_batch_size
        self.num_tokens, self.buffer_tokens, self.buffer_shards = num_tokens, buffer_tokens, buffer_shards
        self.shuffle_sequences, self.val_fraction, self.val_tokens = (
            shuffle_sequences,
            val_fraction,
            val_tokens,
        )
        self.with_grad, self.scaling_mode = with_grad, scaling
        self.lm_dtype, self.lm_seed, self.gguf_file = lm_dtype, lm_seed, gguf_file
        self.exclude_bos = exclude_bos
        self.num_workers, self.seed = num_workers, seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_path = Path(cache_dir) if cache_dir else None
        self.num_classes = None
        self._lm = self._tok = None
        self._hooks: list[Hookpoint] | None = None
        self._val_x: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        if source == "cache":
            if self.cache_path is None or not (self.cache_path / "manifest.json").is_file():
                raise FileNotFoundError(
                    f"data.source=cache: no manifest.json under data.cache_dir={cache_dir!r}; "
                    f"build it with scripts/cache_activations.py"
                )
            self.manifest = json.loads((self.cache_path / "manifest.json").read_text())
            if not self.manifest.get("complete"):
                raise RuntimeError(
                    f"{self.cache_path}: the cache is incomplete (resume scripts/cache_activations.py)"
                )
            self.hookpoint_names = self.manifest["hookpoints"]
            self.input_shape = (len(self.hookpoint_names), int(self.manifest["d"]))
            self.lm_name = self.manifest.get("lm", lm)
        else:
            self._load_text()
            self.hookpoint_names = [h.name for h in self.hooks]
            x, _ = self.activations_for(self.train_ids[:1], self.train_mask[:1])
            self.input_shape = (len(self.hookpoint_names), int(x.shape[-1]))

    # -- LM and text -------------------------------------------------------------------------------
    @property
    def lm(self):
        if self._lm is None:
            if not self.lm_name:
                raise RuntimeError("no data.lm: this evaluation needs the language model")
            try:
                self._lm, self._tok = load_lm(self.lm_name, self.lm_dtype, self.lm_seed, self.gguf_file)
            except OSError as e:  # transformers' own message says neither the key nor the name
                raise OSError(f"data.lm={self.lm_name!r} cannot be loaded: {e}") from e
            self._lm.requires_grad_(False)
            self._lm.to(self.device)
        return self._lm

    @property
    def tokenizer(self):
        self.lm  # noqa: B018 (loads both)
        return self._tok

    @property
    def hooks(self) -> list[Hookpoint]:
        if self._hooks is None:
            self._hooks = resolve_hookpoints(self.lm, self.patterns)
            if not self._hooks:
                raise ValueError(f"data.hookpoints={self.patterns} matched nothing")
        return self._hooks

    @property
    def has_lm_head(self) -> bool:
        return self.lm.get_output_embeddings() is not None

    def _load_text(self) -> None:
        text = self.text if self.text is not None else default_text()
        if text == "synthetic":
            docs = synthetic_documents(self.max_docs or 2000, self.seed)
        else:
            docs = load_documents(
                text,
                self.tokenizer,
                self.text_field,
                self.chat,
                max_docs=self.max_docs,
                sample_by=self.sample_by,
            )
        ids, mask = tokenize_sequences(docs, self.tokenizer, self.ctx_len, self.packing)
        if len(ids) < 2:
            # no documents at all is a wrong field name, not a long context
            hint = "lower data.ctx_len" if docs else f"no document has the field data.text_field={self.text_field!r}"
            raise ValueError(f"{text}: only {len(ids)} sequences of {self.ctx_len} tokens; {hint}")
        n_val = max(1, int(len(ids) * self.val_fraction))
        self.train_ids, self.train_mask = ids[:-n_val], mask[:-n_val]
        self.val_ids, self.val_mask = ids[-n_val:], mask[-n_val:]

    @property
    def drop_token_id(self) -> int | None:
        """The token whose positions are left out (BOS with `exclude_bos`), or None."""
        return getattr(self.tokenizer, "bos_token_id", None) if self.exclude_bos else None

    def activations_for(self, ids: torch.Tensor, mask: torch.Tensor):
        return lm_activations(self.lm, self.hooks, ids.to(self.device), mask.to(self.device), self.with_grad,
                              self.drop_token_id)

    # -- held-out activations, scaling -------------------------------------------------------------
    def val_activations(self) -> torch.Tensor:
        if self._val_x is None:
            if self.source == "cache":
                val = self.manifest.get("val_file")
                x = torch.from_numpy(np.load(self.cache_path / val)) if val else None
                if x is None:
                    x = torch.from_numpy(
                        np.asarray(
                            np.load(self.cache_path / self.manifest["shards"][-1]["file"], mmap_mode="r")
                        )
                    )
                self._val_x = x[: self.val_tokens].float()
            else:
                chunks, n = [], 0
                for s in range(0, len(self.val_ids), self.lm_batch_size):
                    x, _ = lm_activations(
                        self.lm,
                        self.hooks,
                        self.val_ids[s : s + self.lm_batch_size].to(self.device),
                        self.val_mask[s : s + self.lm_batch_size].to(self.device),
                        drop_token_id=self.drop_token_id,
                    )
                    chunks.append(x.cpu())
                    n += len(x)
                    if n >= self.val_tokens:
                        break
                self._val_x = torch.cat(chunks)[: self.val_tokens]
        return self._val_x

    def site_scales(self) -> torch.Tensor:
        """(S,) the per-site factors `normalize` multiplies by (ones without scaling)."""
        if self.scale is None:
            s, d = self.input_shape
            if self.scaling_mode == "unit_sqrt_d":
                x = self.val_activations()
                self.scale = math.sqrt(d) / x.norm(dim=-1).mean(0).clamp_min(1e-8)  # (S,)
            else:
                self.scale = torch.ones(s)
        return self.scale

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        if self.scaling_mode == "none":
            return x
        sc = self.site_scales().to(x.device)
        return x * (sc[:, None] if x.ndim == 3 else sc[0])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaling_mode == "none":
            return x
        sc = self.site_scales().to(x.device)
        return x / (sc[:, None] if x.ndim == 3 else sc[0])

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        batch["x"] = self.normalize(batch["x"])
        if "grad" in batch and self.scaling_mode != "none":
            batch["grad"] = batch["grad"] / self.site_scales().to(batch["grad"].device)[:, None]
        return batch

    # -- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self):
        ds = (
            CachedActivationStream(self, self.batch_size)
            if self.source == "cache"
            else LMActivationStream(self, self.batch_size)
        )
        return StatefulLoader(ds)

    def val_dataloader(self):
        return TensorBatches(self.val_activations(), self.batch_size)

    def eval_dataloader(self, split: str, batch_size: int):
        """Held-out activations (raw; `normalize` is applied by the evaluator context)."""
        return TensorBatches(self.val_activations(), batch_size)

    def eval_sequences(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out token sequences for CE-recovered evaluation."""
        if self.source == "cache":
            if not hasattr(self, "val_ids"):
                self.text = self.text or self.manifest.get("text")
                self.patterns = self.manifest.get("patterns", self.hookpoint_names)
                for k in ("ctx_len", "packing", "chat", "text_field", "sample_by", "max_docs"):
                    if k in self.manifest:
                        setattr(self, k, self.manifest[k])
                self._load_text()
        return self.val_ids[:n], self.val_mask[:n]

    def describe(self) -> str:
        where = f"cache {self.cache_path}" if self.source == "cache" else f"{self.lm_name} on {self.device}"
        return (
            f"ActivationDataModule({where}: {self.hookpoint_names} d={self.input_shape[1]}, "
            f"batches of {self.batch_size} tokens, packing={self.packing})"
        )
