"""AriEL (card 9): the codec is exact on the LM's support (every sentence of <= max_len words, enumerated),
every point of the cube decodes to a sentence, box volumes are the LM's sequence probabilities, a plugged-in
LM with true zeros never yields a sentence outside its support; the toy grammar's recogniser on hand examples;
the sentence data's errors; a tiny sentence-AE baseline learns; the VAE's KL annealing schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from aeforge.data.sentences import BOS, EOS, PAD, UNK, SentenceDataModule, ToyGrammar
from aeforge.data.sources import DataFileError
from aeforge.eval.text_generation import sentences
from aeforge.models.ariel import AriEL, decode_points, encode_sentences
from aeforge.models.base import RunProgress
from aeforge.models.text_ae import RNNSentenceAE
from aeforge.objectives.text import AnnealedGaussianKL, TokenCrossEntropy, token_mask

MAX_LEN, VOCAB, D = 3, 7, 2  # words UNK, 4, 5, 6; sentences of 0..3 words: 1 + 4 + 16 + 64 = 85


def all_sentences(words=(UNK, 4, 5, 6), max_len=MAX_LEN) -> torch.Tensor:
    rows = [list(w) + [EOS] + [PAD] * (max_len - n)
            for n in range(max_len + 1) for w in itertools.product(words, repeat=n)]
    return torch.tensor(rows)


@pytest.fixture(scope="module", params=["lstm", "transformer"])
def ariel(request):
    torch.manual_seed(0)
    model = AriEL((MAX_LEN + 1, VOCAB), latent_dim=D, lm=request.param, embed_dim=8, hidden_dim=16, chunk_size=32)
    return model.eval()


def test_encode_decode_is_identity_on_the_whole_support(ariel):
    x = all_sentences()
    assert torch.equal(ariel.generate(ariel.encode({"x": x})), x)  # exact, every sentence


def test_box_volumes_are_sequence_probabilities_and_tile_the_cube(ariel):
    x = all_sentences()
    _, low, width = encode_sentences(ariel.lm, x, D, MAX_LEN, 32)
    volume = width.prod(1)
    torch.testing.assert_close(volume, ariel.sequence_log_prob(x).exp(), rtol=1e-5, atol=0)
    assert abs(float(volume.sum()) - 1.0) < 1e-9  # PAD/BOS have no mass; sentences of <= max_len words tile it
    assert bool((low >= 0).all() and (low + width <= 1 + 1e-12).all())


def test_any_point_decodes_to_a_sentence_whose_box_holds_it(ariel):
    g = torch.Generator().manual_seed(1)
    u = torch.cat([torch.rand(300, D, generator=g, dtype=torch.float64),
                   torch.tensor([[0.0, 0.0], [1 - 1e-16, 1 - 1e-16], [0.5, 1 - 1e-16]], dtype=torch.float64)])
    y = ariel.generate(u)
    assert y.shape == (len(u), MAX_LEN + 1)
    assert bool(((y == EOS).sum(1) == 1).all())  # exactly one EOS per row ...
    ends = (y == EOS).int().argmax(1)
    words = torch.arange(MAX_LEN + 1) < ends[:, None]
    assert bool((y[words] > EOS).all()) and bool((y[~words & (y != EOS)] == PAD).all())  # ... words, then PAD
    _, low, width = encode_sentences(ariel.lm, y, D, MAX_LEN, 32)
    assert bool(((low <= u) & (u <= low + width)).all())
    assert torch.equal(ariel.generate(ariel.encode({"x": y})), y)


class TableLM(torch.nn.Module):
    """A plugged-in causal LM with true zeros: after BOS 4 or 5; 4 -> 5 | EOS; 5 -> 6 | EOS; 6 -> EOS."""

    def __init__(self):
        super().__init__()
        p = torch.zeros(VOCAB, VOCAB)
        p[BOS, 4], p[BOS, 5] = 0.3, 0.7
        p[4, 5], p[4, EOS], p[5, 6], p[5, EOS], p[6, EOS], p[EOS, EOS] = 0.6, 0.4, 0.2, 0.8, 1.0, 1.0
        self.register_buffer("logp", p.log())

    def initial_state(self, batch, device):
        return None

    def step(self, tokens, state):
        return self.logp[tokens], state


def test_a_plugged_in_lm_with_zeros_decodes_only_its_support():
    lm = TableLM()
    support = {(4,), (5,), (4, 5), (5, 6), (4, 5, 6)}
    u = torch.rand(2000, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sentences(decode_points(lm, u, MAX_LEN, chunk=64))
    assert set(got) == support
    # uniform points find each sentence in proportion to its probability (its box volume)
    assert abs(got.count((5,)) / len(got) - 0.7 * 0.8) < 0.04
    x = torch.tensor([list(s) + [EOS] + [PAD] * (MAX_LEN - len(s)) for s in sorted(support)])
    centres, _, width = encode_sentences(lm, x, D, MAX_LEN, chunk=64)
    assert torch.equal(decode_points(lm, centres, MAX_LEN, chunk=64), x)
    assert abs(float(width.prod(1).sum()) - 1.0) < 1e-12


def test_toy_grammar_recogniser_on_hand_examples():
    g = ToyGrammar()
    for good in ("is it the ball ?", "is a red cat small ?", "does the dog touch a big wooden box ?",
                 "can you see the cup on the table near a lamp ?", "is the book under a chair ?"):
        assert g.is_valid(good.split()), good
    for bad in ("is it the ball", "is it ball ?", "the ball ?", "is the red ?", "does the dog touch ?",
                "is it the ball ? ?", "", "can you see the cup on ?"):
        assert not g.is_valid(bad.split()), bad


def test_sentence_data_splits_and_errors(tmp_path):
    dm = SentenceDataModule(n_sentences=300, max_len=10, batch_size=8, seed=3)
    assert dm.input_shape == (11, dm.vocab_size) and dm.vocab_size == 4 + 34
    train, test = dm.sentence_sets["train"], dm.sentence_sets["test"]
    assert train and test and not train & test  # unique sentences, disjoint splits
    assert all(dm.is_valid(list(s) + [EOS]) for s in train)
    again = SentenceDataModule(n_sentences=300, max_len=10, batch_size=8, seed=3)
    assert torch.equal(dm.tensors["train"][0], again.tensors["train"][0])  # seeded
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 11) and bool((batch["x"].gather(1, batch["length"][:, None] - 1) == EOS).all())
    with pytest.raises(ValueError, match="toy_grammar"):
        SentenceDataModule(source="wikitext")
    with pytest.raises(DataFileError, match="nope.txt"):
        SentenceDataModule(source="text_file", path=str(tmp_path / "nope.txt"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("First Citizen:\nBefore we proceed, hear me speak.\n\nAll:\nSpeak, speak. Yes!\n")
    dm = SentenceDataModule(source="text_file", path=str(corpus), val_fraction=0, test_fraction=0)
    assert sorted(" ".join(dm.decode_ids(r)) for r in dm.tensors["train"][0]) == [
        "before we proceed , hear me speak .", "speak , speak .", "yes !"]


def test_kl_annealing_follows_progress():
    kl = AnnealedGaussianKL(anneal_fraction=0.5, schedule="linear")
    out = {"mu": torch.ones(2, 3), "logvar": torch.zeros(2, 3)}  # KL = 1.5 nats per row
    at = [float(kl(out, {"progress": RunProgress.of(s, 100, 0)})) for s in (0, 25, 50, 90)]
    assert at == pytest.approx([0.0, 0.75, 1.5, 1.5])
    assert float(kl(out, {})) == pytest.approx(1.5)  # evaluation: no progress, full weight


def test_tiny_sentence_ae_learns():
    torch.manual_seed(0)
    dm = SentenceDataModule(n_sentences=200, max_len=8, seed=0)
    x = dm.tensors["train"][0][:64]
    model = RNNSentenceAE(dm.input_shape, latent_dim=8, embed_dim=16, hidden_dim=32)
    ce = TokenCrossEntropy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = token_mask(x)

    def word_accuracy() -> float:  # greedy reconstruction generate(encode(x)), words and EOS
        model.eval()
        acc = float(((model.reconstruct({"x": x}) == x) & mask).sum() / mask.sum())
        model.train()
        return acc

    before, losses = word_accuracy(), []
    for _ in range(60):
        loss = ce(model({"x": x}), {"x": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    after = word_accuracy()
    assert after > 0.2 and after > 3 * before  # measured: 0.06 untrained, 0.28 after 60 steps
