"""Sentences for sentence autoencoders and AriEL: a toy context-free grammar (generated, with a recogniser
that checks any token sequence against it) or a real corpus cut into sentences; a word vocabulary with
PAD/BOS/EOS/UNK, right padding, seeded train/val/test splits of unique sentences.

A batch is {"x": (B, max_len + 1) int64 token ids, the sentence then EOS then PAD; "length": (B,) tokens
including EOS}. `input_shape` = (max_len + 1, vocab_size): a sentence as a one-hot (position, word) grid,
which is how text models learn the vocabulary size from the pipeline (it injects only `input_shape`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from aeforge.data.sources import missing_file

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
NEVER_IN_SENTENCE = (PAD, BOS)  # models give these zero probability as a next token
SOURCES = ("toy_grammar", "text_file")


class ToyGrammar:
    """A small context-free grammar of questions about objects (34 terminals, recursive through PP), in
    the spirit of the AriEL paper's toy grammar, whose exact rules the card leaves [TBD]. Rules carry
    sampling weights; `is_valid` is an Earley recogniser, so any sequence can be checked, not only samples."""

    RULES: dict[str, list[tuple[tuple[str, ...], float]]] = {
        "S": [(("Q", "?"), 1.0)],
        "Q": [(("is", "it", "NP"), 3.0), (("is", "NP", "ADJ"), 2.0), (("is", "NP", "PP"), 2.0),
              (("does", "NP", "VERB", "NP"), 2.0), (("can", "you", "see", "NP"), 1.0)],
        "NP": [(("DET", "NOM"), 1.0)],
        "NOM": [(("ADJ", "NOM"), 1.0), (("NOUN",), 3.0), (("NOUN", "PP"), 1.0)],
        "PP": [(("PREP", "NP"), 1.0)],
        "DET": [(("the",), 1.0), (("a",), 1.0)],
        "ADJ": [((w,), 1.0) for w in ("red", "blue", "green", "yellow", "big", "small", "round", "wooden")],
        "NOUN": [((w,), 1.0) for w in ("ball", "cup", "table", "chair", "dog", "cat", "box", "book", "lamp")],
        "PREP": [((w,), 1.0) for w in ("on", "under", "near", "behind", "inside")],
        "VERB": [((w,), 1.0) for w in ("touch", "hold", "cover")],
    }
    START = "S"

    def __init__(self):
        self.terminals = sorted({s for alts in self.RULES.values() for rhs, _ in alts for s in rhs
                                 if s not in self.RULES})

    def sample(self, rng: random.Random, max_len: int, tries: int = 1000) -> list[str]:
        """One sentence of at most max_len words (longer derivations are redrawn)."""
        for _ in range(tries):
            out = self._expand(self.START, rng, budget=[max_len + 1])
            if out is not None and len(out) <= max_len:
                return out
        raise ValueError(f"the toy grammar produced no sentence of <= {max_len} words in {tries} tries")

    def _expand(self, symbol: str, rng, budget: list[int]) -> list[str] | None:
        if symbol not in self.RULES:
            budget[0] -= 1
            return [symbol] if budget[0] >= 0 else None
        alts = self.RULES[symbol]
        rhs = rng.choices(alts, weights=[a[1] for a in alts])[0][0]
        out: list[str] = []
        for s in rhs:
            part = self._expand(s, rng, budget)
            if part is None:  # over budget: abandon this derivation early (the recursion is unbounded)
                return None
            out.extend(part)
        return out

    def is_valid(self, words: list[str]) -> bool:
        """Earley recognition of `words` from S."""
        n = len(words)
        chart: list[set] = [set() for _ in range(n + 1)]
        chart[0] = {("^", (self.START,), 0, 0)}
        for i in range(n + 1):
            agenda = list(chart[i])
            while agenda:
                lhs, rhs, dot, origin = agenda.pop()
                if dot < len(rhs) and rhs[dot] in self.RULES:  # predict
                    new = [(rhs[dot], r, 0, i) for r, _ in self.RULES[rhs[dot]]]
                    # a nonterminal completed at i before this prediction (nullable rules do not exist here)
                elif dot < len(rhs):  # scan
                    if i < n and words[i] == rhs[dot]:
                        chart[i + 1].add((lhs, rhs, dot + 1, origin))
                    continue
                else:  # complete
                    new = [(l2, r2, d2 + 1, o2) for (l2, r2, d2, o2) in list(chart[origin])
                           if d2 < len(r2) and r2[d2] == lhs]
                for item in new:
                    if item not in chart[i]:
                        chart[i].add(item)
                        agenda.append(item)
        return ("^", (self.START,), 1, 0) in chart[n]


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,!?;:]")


def corpus_sentences(text: str, lowercase: bool = True) -> list[list[str]]:
    """Sentences of a play-formatted corpus (Tiny Shakespeare): speaker lines ("First Citizen:") dropped,
    each speech joined into one string and cut after . ! ? ; words and punctuation are tokens."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip() and not re.fullmatch(r"[A-Z][\w ,'.-]*:\s*", ln)]
        speech = " ".join(ln.strip() for ln in lines)
        speech = speech.lower() if lowercase else speech
        for sent in re.split(r"(?<=[.!?])\s+", speech):
            words = _WORD.findall(sent)
            if words:
                out.append(words)
    return out


class SentenceDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor):
        self.ids, self.lengths = ids, lengths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(idx)
        return {"x": self.ids[t], "length": self.lengths[t]}


class SentenceDataModule(pl.LightningDataModule):
    modality = "text"

    def __init__(
        self,
        source: str = "toy_grammar",
        path: str | None = None,
        n_sentences: int = 10000,
        max_len: int = 15,
        min_len: int = 1,
        max_vocab: int = 2000,
        max_corpus_sentences: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        lowercase: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """source: toy_grammar (n_sentences drawn from ToyGrammar, duplicates removed before splitting) or
        text_file (sentences of the file at `path`, max_vocab most frequent training words, the rest UNK).
        Sentences have min_len..max_len words; splits are of unique sentences, seeded by `seed`."""
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}; valid: {list(SOURCES)}")
        self.source, self.path, self.max_len = source, path, max_len
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        rng = np.random.default_rng(seed)
        self.grammar = ToyGrammar() if source == "toy_grammar" else None
        if self.grammar is not None:
            draw = random.Random(seed)  # the stdlib draw is ~20x faster than numpy's per-symbol choice
            sents = [self.grammar.sample(draw, max_len) for _ in range(n_sentences)]
        else:
            if not path:
                raise ValueError("data.source=text_file needs data.path=<a .txt corpus>")
            if not Path(path).is_file():
                raise missing_file(path)
            sents = corpus_sentences(Path(path).read_text(encoding="utf-8"), lowercase)
        sents = [s for s in sents if min_len <= len(s) <= max_len]
        unique = sorted({tuple(s) for s in sents})  # sorted: the split depends on the seed only
        order = rng.permutation(len(unique))
        if max_corpus_sentences:
            order = order[:max_corpus_sentences]
        n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
        if len(order) - n_val - n_test < 1:
            raise ValueError(f"data: {len(order)} sentences of {min_len}..{max_len} words leave no training split")
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        splits = {k: [unique[i] for i in v] for k, v in parts.items()}
        if self.grammar is not None:
            words = self.grammar.terminals
        else:
            counts = Counter(w for s in splits["train"] for w in s)
            words = sorted(w for w, _ in counts.most_common(max_vocab))
        self.vocab = SPECIALS + list(words)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.tensors = {k: self._tensorise(v) for k, v in splits.items()}
        # the corpus as the model sees it (ids, UNK included): for in-corpus / novelty checks of samples
        self.sentence_sets = {k: {tuple(r[: n - 1].tolist()) for r, n in zip(*self.tensors[k])} for k in splits}
        self.input_shape = (max_len + 1, len(self.vocab))
        self.num_classes = None

    def _tensorise(self, sents: list[tuple[str, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(sents), self.max_len + 1), PAD, dtype=torch.long)
        lengths = torch.empty(len(sents), dtype=torch.long)
        for i, s in enumerate(sents):
            row = [self.index.get(w, UNK) for w in s] + [EOS]
            ids[i, : len(row)] = torch.tensor(row)
            lengths[i] = len(row)
        return ids, lengths

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode_ids(self, ids) -> list[str]:
        """Token ids to words, up to (not including) the first EOS/PAD."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i in (EOS, PAD):
                break
            out.append(self.vocab[i])
        return out

    def is_valid(self, ids) -> bool | None:
        """Grammaticality under the toy grammar; None for a corpus without a grammar."""
        return None if self.grammar is None else self.grammar.is_valid(self.decode_ids(ids))

    def dataset(self, split: str) -> SentenceDataset:
        if split not in self.tensors:
            raise ValueError(f"split {split!r}; valid: {sorted(self.tensors)}")
        return SentenceDataset(*self.tensors[split])

    def train_dataloader(self):
        from aeforge.data.loading import ResumableLoader

        return ResumableLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True, seed=self.seed,
                               num_workers=self.num_workers)

    def val_dataloader(self):
        from aeforge.data.loading import ResumableLoader

        split = "val" if len(self.tensors["val"][0]) else "train"
        return ResumableLoader(self.dataset(split), batch_size=self.batch_size, shuffle=False, seed=self.seed)

    def eval_dataloader(self, split: str, batch_size: int):
        from aeforge.data.loading import ResumableLoader

        return ResumableLoader(self.dataset(split), batch_size=batch_size, shuffle=False, seed=self.seed)

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        return x  # token ids are used as they are

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v[0])}" for k, v in self.tensors.items())
        what = "toy grammar" if self.grammar is not None else Path(str(self.path)).name
        return f"SentenceDataModule({what}: {sizes} sentences, vocab {len(self.vocab)}, max_len {self.max_len})"
