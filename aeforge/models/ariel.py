"""AriEL (Celotti, Brodeur & Rouat 2020): arithmetic coding + k-d trees over a language model's next-token
probabilities. The only learned part is a causal LM (an LSTM by default, trained with cross-entropy); the
encoder and decoder are fixed algorithms that give every sentence a box in the unit cube [0, 1]^d:

- token t (0-based) splits the current box along axis t mod d into one interval per vocabulary word, in
  vocabulary order, of width proportional to p(w_t = w | w_<t) (the LM's next-token distribution);
- EOS is an ordinary token with its own interval; after `max_len` words EOS is forced (probability 1, no
  split), so the boxes of all sentences of <= max_len words tile the cube and each box's volume is the LM's
  probability of the sentence (the truncated sentences share the mass of everything longer);
- encode returns the centre of the sentence's box; decode walks down the tree from any point, so every
  point of the cube decodes to a sentence, and uniform points find sentences in proportion to their
  probability.

The LM never predicts PAD or BOS (their logits are -inf), so those intervals have width 0 and are never
chosen. Boxes are float64; a float64 point can hold about 52 bits per axis, so a sentence whose box is
narrower than ~2^-52 of the cube's side on some axis cannot be recovered from its centre (`codec_bits`
reports the bits a sentence needs per axis). Encode and decode run the LM one step at a time on blocks of
exactly `chunk_size` rows, so both see bit-identical probabilities for the same prefix (a matrix product's
rounding may depend on the number of rows), which makes decode(encode(s)) == s exact, not approximate.

Any causal LM with `initial_state(batch, device)`, `step(tokens (B,), state) -> (logits (B, V), state)` and
`forward(inputs (B, T)) -> logits (B, T, V)` plugs into `encode_sentences` / `decode_points`.
"""

from __future__ import annotations

import torch
from torch import nn

from aeforge.data.sentences import BOS, EOS, NEVER_IN_SENTENCE, PAD
from aeforge.models.base import AutoencoderModel


def _ban(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    logits[..., list(NEVER_IN_SENTENCE)] = float("-inf")  # zero-width intervals in the codec
    return logits


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> linear over the vocabulary; p(w_t | w_<t) with BOS as the first input."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.rnn = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.drop(self.embed(inputs)))
        return _ban(self.out(self.drop(h)))

    def initial_state(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(self.rnn.num_layers, batch, self.rnn.hidden_size, device=device)
        return z, z.clone()

    def step(self, tokens: torch.Tensor, state):
        h, state = self.rnn(self.embed(tokens)[:, None], state)
        return _ban(self.out(h[:, 0])), state


class TransformerLanguageModel(nn.Module):
    """A small causal transformer LM (learned positions); `step` re-reads the whole prefix (sentences are
    short), so its state is the prefix itself."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float,
                 max_positions: int, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(max_positions, embed_dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, heads, hidden_dim, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.out = nn.Linear(embed_dim, vocab_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        t = inputs.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=inputs.device)
        h = self.blocks(self.embed(inputs) + self.pos[:t], mask=mask, is_causal=True)
        return _ban(self.out(self.norm(h)))

    def initial_state(self, batch: int, device) -> torch.Tensor:
        return torch.empty(batch, 0, dtype=torch.long, device=device)

    def step(self, tokens: torch.Tensor, state):
        prefix = torch.cat([state, tokens[:, None]], 1)
        return self(prefix)[:, -1], prefix


# -- the codec ------------------------------------------------------------------------------------------
def _intervals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower edge, width) of every token's interval in [0, 1], float64, from next-token logits."""
    cum = torch.softmax(logits.double(), -1).cumsum(-1)
    cum = cum / cum[:, -1:]
    lower = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], 1)
    return lower, cum - lower


def _blocks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if len(t) == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])])


@torch.no_grad()
def encode_sentences(lm, tokens: torch.Tensor, latent_dim: int, max_len: int, chunk: int = 256):
    """tokens: (B, >= max_len + 1) ids, each row a sentence then EOS (then PAD). Returns (centres (B, d),
    lows (B, d), widths (B, d)), float64: the box of each sentence in [0, 1]^d."""
    lengths = (tokens == EOS).int().argmax(1) + 1
    if not bool((tokens == EOS).any(1).all()):
        raise ValueError("encode: every sentence must end with EOS")
    if int(lengths.max()) > max_len + 1:
        raise ValueError(f"encode: a sentence has {int(lengths.max()) - 1} words; the codec holds <= {max_len}")
    device = tokens.device
    lows, widths = [], []
    for s, e in _blocks(len(tokens), chunk):
        tok, n = _pad_rows(tokens[s:e], chunk), _pad_rows(lengths[s:e], chunk)
        low = torch.zeros(chunk, latent_dim, dtype=torch.float64, device=device)
        width = torch.ones_like(low)
        state = lm.initial_state(chunk, device)
        inp = torch.full((chunk,), BOS, dtype=torch.long, device=device)
        for t in range(max_len):  # at t == max_len EOS is forced: no split
            logits, state = lm.step(inp, state)
            lower, size = _intervals(logits)
            k, w, live = t % latent_dim, tok[:, t], t < n
            edges = low[:, k:k + 1] + width[:, k:k + 1] * lower  # the same arithmetic as decode's
            low[:, k] = torch.where(live, edges.gather(1, w[:, None])[:, 0], low[:, k])
            width[:, k] = torch.where(live, width[:, k] * size.gather(1, w[:, None])[:, 0], width[:, k])
            inp = torch.where(live, w, torch.full_like(w, EOS))
        lows.append(low[: e - s])
        widths.append(width[: e - s])
    low, width = torch.cat(lows), torch.cat(widths)
    return low + width / 2, low, width


@torch.no_grad()
def decode_points(lm, points: torch.Tensor, max_len: int, chunk: int = 256) -> torch.Tensor:
    """points: (B, d) in [0, 1]^d. Returns (B, max_len + 1) ids: the sentence whose box holds each point,
    then EOS, then PAD."""
    points = points.double()
    latent_dim, device = points.shape[1], points.device
    outs = []
    for s, e in _blocks(len(points), chunk):
        u = _pad_rows(points[s:e], chunk)
        low = torch.zeros(chunk, latent_dim, dtype=torch.float64, device=device)
        width = torch.ones_like(low)
        out = torch.full((chunk, max_len + 1), PAD, dtype=torch.long, device=device)
        done = torch.zeros(chunk, dtype=torch.bool, device=device)
        state = lm.initial_state(chunk, device)
        inp = torch.full((chunk,), BOS, dtype=torch.long, device=device)
        for t in range(max_len):
            logits, state = lm.step(inp, state)
            lower, size = _intervals(logits)
            k = t % latent_dim
            edges = low[:, k:k + 1] + width[:, k:k + 1] * lower
            # the last token whose interval starts at or below the point and has a width (zero-width ones share
            # their edge with the next token)
            ok = (edges <= u[:, k:k + 1]) & (size > 0)
            idx = torch.arange(ok.shape[1], device=device)
            w = torch.where(ok, idx, -1).amax(1)
            w = torch.where(w < 0, torch.where(size > 0, idx, ok.shape[1]).amin(1), w)  # below the box: rounding
            live = ~done
            low[:, k] = torch.where(live, edges.gather(1, w[:, None])[:, 0], low[:, k])
            width[:, k] = torch.where(live, width[:, k] * size.gather(1, w[:, None])[:, 0], width[:, k])
            out[:, t] = torch.where(live, w, torch.full_like(w, PAD))
            done = done | (w == EOS)
            inp = torch.where(live, w, torch.full_like(w, EOS))
            if bool(done.all()):
                break
        out[:, max_len] = torch.where(done, out[:, max_len], torch.full_like(done, EOS, dtype=torch.long))
        outs.append(out[: e - s])
    return torch.cat(outs)


def codec_bits(widths: torch.Tensor) -> torch.Tensor:
    """Bits per axis a box of these widths needs (-log2 width); > ~52 cannot be held by a float64 point."""
    return -torch.log2(widths)


class AriEL(AutoencoderModel):
    """LM + AriEL codec. Training fits the LM (next-token cross-entropy, objective=token_ce); `encode` maps a
    batch of sentences to box centres in [0, 1]^latent_dim, `generate` decodes any points."""

    modality = "text"
    prior = "uniform_cube"

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int = 16, lm: str = "lstm", embed_dim: int = 64,
                 hidden_dim: int = 128, num_layers: int = 1, dropout: float = 0.0, chunk_size: int = 256):
        super().__init__()
        self.max_len, vocab = int(input_shape[0]) - 1, int(input_shape[1])
        self.latent_dim, self.chunk_size = latent_dim, chunk_size
        if lm == "lstm":
            self.lm = LSTMLanguageModel(vocab, embed_dim, hidden_dim, num_layers, dropout)
        elif lm == "transformer":
            self.lm = TransformerLanguageModel(vocab, embed_dim, hidden_dim, num_layers, dropout, self.max_len + 1)
        else:
            raise ValueError(f"model.lm={lm!r}; valid: ['lstm', 'transformer']")

    def forward(self, batch):
        x = batch["x"]
        inputs = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)
        return {"logits": self.lm(inputs)}

    def encode(self, batch):
        return encode_sentences(self.lm, batch["x"], self.latent_dim, self.max_len, self.chunk_size)[0]

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return decode_points(self.lm, z, self.max_len, self.chunk_size)

    def reconstruct(self, batch):
        return self.generate(self.encode(batch))

    @torch.no_grad()
    def sequence_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(sentence, EOS) under the LM (teacher forcing), per row of x; the forced EOS after max_len
        words counts as probability 1, as in the codec."""
        logp = torch.log_softmax(self.forward({"x": x})["logits"].double(), -1)
        tok = logp.gather(2, x[:, :, None])[:, :, 0]
        keep = (torch.arange(x.shape[1], device=x.device) < ((x == EOS).int().argmax(1) + 1)[:, None])
        keep[:, self.max_len:] = False
        return torch.where(keep, tok, torch.zeros_like(tok)).sum(1)
