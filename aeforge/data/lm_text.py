"""Text for activation data: documents from local files or hub datasets (plain or chat-formatted), and
their token sequences (`packing: block`: documents concatenated with BOS and cut into `ctx_len` blocks, the
standard regime; `per_instance`: one instance per sequence, padded, never attending across instances — FAST).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from aeforge.data.lm import ByteTokenizer
from aeforge.data.sources import DATA_ENV, README_DATA, DataFileError, _env_value

log = logging.getLogger("aeforge")


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
    repository. None there is an error: an SAE trained on generated words instead of the corpus it was meant
    for is a wasted run, so synthetic text is only used when asked for (`data.text=synthetic`)."""
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
    looked = ", ".join(str(Path(r) / "text" / "tinyshakespeare.txt") for r in roots if r)
    raise DataFileError(
        f"data.text is null and the default corpus is not there (looked at {looked}; {_env_value(DATA_ENV)}). "
        f"Set {DATA_ENV}=<folder> that holds text/tinyshakespeare.txt, give a corpus with data.text=<file, "
        f"folder or hub dataset>, or train on generated words on purpose with data.text=synthetic; see {README_DATA}"
    )


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
