"""Generation by random sampling of the latent space, one evaluator for AriEL and the sentence AEs (card 9).

Codes are drawn where the model says its sentences live (`model.prior`): AriEL uniformly in [0, 1]^d, a VAE
from N(0, I), a deterministic AE uniformly in the bounding box of its training codes. Each is decoded
(`model.generate`) and the sentences are scored:

- valid: fraction grammatical under the toy grammar (only data with a grammar); valid_unique: distinct
  grammatical sentences / samples; valid_novel: distinct grammatical sentences absent from the training split
  / samples — the paper's "variety of correct sentences";
- unique, novel (not in the training split), in_corpus (in any split of the corpus), bigram_in_corpus
  (fraction of the samples' word bigrams, sentence edges included, seen in training): for a real corpus
  there is no grammar, and these are what is measurable without another model;
- distinct_n: distinct n-grams / n-grams over all samples; vocab_coverage; mean_length; empty;
- resample_exact: fraction of the samples s with generate(encode(s)) == s (AriEL's exactness on what its LM
  produces);
- reconstruction of held-out (test) sentences: exact sentence match and per-token accuracy of
  generate(encode(x)); lm_test_ppl: per-token perplexity of the test split under the model's LM (AriEL).
`eval.max_samples` caps both the samples and the held-out sentences (debug=smoke makes both tiny).
"""

from __future__ import annotations

import torch

from aeforge.data.sentences import EOS, PAD

PRIORS = ("uniform_cube", "gaussian", "bounding_box")


def sentences(ids: torch.Tensor) -> list[tuple[int, ...]]:
    """Rows of ids to word-id tuples, up to the first EOS/PAD."""
    out = []
    for row in ids.tolist():
        words = []
        for i in row:
            if i in (EOS, PAD):
                break
            words.append(i)
        out.append(tuple(words))
    return out


def distinct_n(sents: list[tuple[int, ...]], n: int) -> float:
    grams = [s[i:i + n] for s in sents for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bigrams(s: tuple[int, ...]) -> list[tuple]:
    padded = ("<s>", *s, "</s>")
    return list(zip(padded[:-1], padded[1:]))


class TextGeneration:
    """Evaluator (eval group): sample n_samples codes from the model's prior, decode, score (module doc)."""

    def __init__(self, n_samples: int = 1000, seed: int = 0, max_n: int = 3):
        self.n_samples, self.seed, self.max_n = n_samples, seed, max_n

    @torch.no_grad()
    def latents(self, ctx, n: int) -> torch.Tensor:
        model, g = ctx.model, torch.Generator().manual_seed(self.seed)
        prior = getattr(model, "prior", None)
        if prior not in PRIORS:
            raise ValueError(f"eval text_generation: model {type(model).__name__} has prior={prior!r}; a text model "
                             f"names one of {list(PRIORS)}")
        d = model.latent_dim
        if prior == "uniform_cube":
            return torch.rand(n, d, generator=g, dtype=torch.float64)
        if prior == "gaussian":
            return torch.randn(n, d, generator=g)
        codes, _ = ctx.features("train")
        lo, hi = codes.min(0).values, codes.max(0).values
        return lo + (hi - lo) * torch.rand(n, d, generator=g)

    @torch.no_grad()
    def generate(self, ctx, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([ctx.model.generate(z[s:s + ctx.batch_size].to(ctx.device)).cpu()
                          for s in range(0, len(z), ctx.batch_size)])

    def __call__(self, ctx) -> dict[str, float]:
        dm = ctx.datamodule
        n = self.n_samples if ctx.max_samples is None else min(self.n_samples, ctx.max_samples)
        ids = self.generate(ctx, self.latents(ctx, n))
        samples = sentences(ids)
        train = dm.sentence_sets["train"]
        corpus = set().union(*dm.sentence_sets.values())
        out = {
            "unique": len(set(samples)) / n,
            "novel": sum(s not in train for s in samples) / n,
            "in_corpus": sum(s in corpus for s in samples) / n,
            "mean_length": sum(map(len, samples)) / n,
            "empty": sum(len(s) == 0 for s in samples) / n,
            "vocab_coverage": len({w for s in samples for w in s}) / (dm.vocab_size - 3),  # words and UNK
        }
        seen = {b for s in train for b in _bigrams(s)}
        grams = [b for s in samples for b in _bigrams(s)]
        out["bigram_in_corpus"] = sum(b in seen for b in grams) / len(grams)
        for k in range(1, self.max_n + 1):
            out[f"distinct_{k}"] = distinct_n(samples, k)
        if dm.grammar is not None:
            valid = [s for s in samples if dm.grammar.is_valid([dm.vocab[i] for i in s])]
            out["valid"] = len(valid) / n
            out["valid_unique"] = len(set(valid)) / n
            out["valid_novel"] = len(set(valid) - train) / n
        out["resample_exact"] = self.resample_exact(ctx, ids)
        out.update(self.reconstruction(ctx))
        return out

    @torch.no_grad()
    def resample_exact(self, ctx, ids: torch.Tensor) -> float:
        """Fraction of the generated sentences that generate(encode(.)) returns unchanged (AriEL: 1 by
        construction, up to float64 precision; an AE: whether its samples are fixed points of the round trip)."""
        same = 0
        for s in range(0, len(ids), ctx.batch_size):
            x = ids[s:s + ctx.batch_size].to(ctx.device)
            same += int((ctx.model.generate(ctx.model.encode({"x": x})) == x).all(1).sum())
        return same / len(ids)

    @torch.no_grad()
    def reconstruction(self, ctx) -> dict[str, float]:
        exact = correct = tokens = count = 0
        nll = 0.0
        for batch in ctx.batches("test", "text reconstruction"):
            x = batch["x"]
            y = ctx.model.generate(ctx.model.encode(batch))
            mask = torch.arange(x.shape[1], device=x.device) < batch["length"][:, None]
            exact += int(((y == x) | ~mask).all(1).sum())
            correct += int(((y == x) & mask).sum())
            tokens += int(mask.sum())
            count += len(x)
            if hasattr(ctx.model, "sequence_log_prob"):
                nll -= float(ctx.model.sequence_log_prob(x).sum())
        if not count:
            return {}
        out = {"recon_exact": exact / count, "recon_token_acc": correct / tokens}
        if hasattr(ctx.model, "sequence_log_prob"):
            out["lm_test_ppl"] = float(torch.tensor(nll / tokens).exp())
        return out
