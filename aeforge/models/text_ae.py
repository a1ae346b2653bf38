"""Sentence autoencoders, the baselines AriEL is compared with (card 9): an RNN seq2seq AE, its VAE (Bowman et
al. 2016: Gaussian posterior, KL annealed by the loss term from batch["progress"], optional word dropout) and a
small transformer AE. Each maps a sentence to a d-dim code and decodes a code greedily back to a sentence.

`prior` says where generation draws codes from (aeforge/eval/text_generation.py): the VAE from N(0, I); the
deterministic AEs, which have no prior, uniformly from the bounding box of their training codes (the card's
"z ~ U of the observed latent bounding box").
"""

from __future__ import annotations

import torch
from torch import nn

from aeforge.data.sentences import BOS, EOS, NEVER_IN_SENTENCE, PAD, UNK
from aeforge.models.base import AutoencoderModel


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)


def _lengths(x: torch.Tensor) -> torch.Tensor:
    return (x == EOS).int().argmax(1) + 1


class _SentenceAE(AutoencoderModel):
    modality = "text"
    prior = "bounding_box"

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, word_dropout: float):
        super().__init__()
        self.max_len, self.vocab_size = int(input_shape[0]) - 1, int(input_shape[1])
        self.latent_dim, self.word_dropout = latent_dim, word_dropout

    def decoder_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """BOS + the sentence shifted right; in training, words replaced by UNK with prob. word_dropout."""
        inputs = _shift_right(x)
        if self.training and self.word_dropout > 0:
            drop = (torch.rand(inputs.shape, device=x.device) < self.word_dropout) & (inputs > UNK)
            inputs = torch.where(drop, torch.full_like(inputs, UNK), inputs)
        return inputs

    def code(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch):
        x = batch["x"]
        out = self.code(x)
        out["logits"] = self._ban(self.decode_logits(out["z"], self.decoder_inputs(x)))
        return out

    def encode(self, batch):
        out = self.code(batch["x"])
        return out.get("mu", out["z"])  # a VAE's code is its posterior mean

    @staticmethod
    def _ban(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., list(NEVER_IN_SENTENCE)] = float("-inf")
        return logits

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of codes (B, d) to (B, max_len + 1) ids: words, EOS, PAD."""
        z = z.to(next(self.parameters()).dtype)
        seq = torch.full((len(z), 1), BOS, dtype=torch.long, device=z.device)
        done = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        out = torch.full((len(z), self.max_len + 1), PAD, dtype=torch.long, device=z.device)
        for t in range(self.max_len):
            w = self._ban(self.decode_logits(z, seq))[:, -1].argmax(-1)
            out[:, t] = torch.where(done, torch.full_like(w, PAD), w)
            done = done | (w == EOS)
            if bool(done.all()):
                break
            seq = torch.cat([seq, w[:, None]], 1)
        out[:, self.max_len] = torch.where(done, out[:, self.max_len], torch.full_like(w, EOS))
        return out

    def reconstruct(self, batch):
        return self.generate(self.encode(batch))


class RNNSentenceAE(_SentenceAE):
    """Embedding -> LSTM/GRU encoder -> last hidden state -> linear -> z -> (linear: the decoder's initial
    state) -> LSTM/GRU decoder with teacher forcing -> logits over the vocabulary."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int = 16, embed_dim: int = 64,
                 hidden_dim: int = 128, cell: str = "lstm", word_dropout: float = 0.0):
        super().__init__(input_shape, latent_dim, word_dropout)
        if cell not in ("lstm", "gru"):
            raise ValueError(f"model.cell={cell!r}; valid: ['lstm', 'gru']")
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.cell = cell
        self.embed = nn.Embedding(self.vocab_size, embed_dim, padding_idx=PAD)
        self.encoder = rnn(embed_dim, hidden_dim, batch_first=True)
        self.decoder = rnn(embed_dim, hidden_dim, batch_first=True)
        self.to_code = nn.Linear(hidden_dim, self.code_width())
        self.from_code = nn.Linear(latent_dim, hidden_dim * (2 if cell == "lstm" else 1))
        self.out = nn.Linear(hidden_dim, self.vocab_size)

    def code_width(self) -> int:
        return self.latent_dim

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(x), _lengths(x).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.encoder(packed)
        return (h[0] if self.cell == "lstm" else h)[-1]

    def code(self, x):
        return {"z": self.to_code(self.summary(x))}

    def decode_logits(self, z, inputs):
        h0 = torch.tanh(self.from_code(z))[None]
        state = tuple(h0.chunk(2, -1)) if self.cell == "lstm" else h0
        h, _ = self.decoder(self.embed(inputs), tuple(s.contiguous() for s in state) if self.cell == "lstm"
                            else state)
        return self.out(h)


class RNNSentenceVAE(RNNSentenceAE):
    """RNNSentenceAE with a Gaussian posterior q(z|x) = N(mu, diag exp(logvar)), reparameterised in training;
    the prior N(0, I) is what generation samples. Loss: objective=text_vae (CE + annealed KL)."""

    prior = "gaussian"

    def code_width(self) -> int:
        return 2 * self.latent_dim

    def code(self, x):
        mu, logvar = self.to_code(self.summary(x)).chunk(2, -1)
        logvar = logvar.clamp(-12, 8)  # keeps exp() finite early in training
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return {"z": z, "mu": mu, "logvar": logvar}


class TransformerSentenceAE(_SentenceAE):
    """Transformer encoder over the sentence -> masked mean pool -> linear -> z; a causal transformer decoder
    cross-attends to z (one memory token) and predicts the sentence with teacher forcing."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int = 16, width: int = 64, depth: int = 2,
                 heads: int = 4, mlp_dim: int = 128, dropout: float = 0.1, word_dropout: float = 0.0):
        super().__init__(input_shape, latent_dim, word_dropout)
        self.embed = nn.Embedding(self.vocab_size, width, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(self.max_len + 1, width))
        nn.init.normal_(self.pos, std=0.02)
        enc = nn.TransformerEncoderLayer(width, heads, mlp_dim, dropout, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(width, heads, mlp_dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, depth, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, depth)
        self.to_code = nn.Linear(width, latent_dim)
        self.from_code = nn.Linear(latent_dim, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, self.vocab_size)

    def code(self, x):
        pad = torch.arange(x.shape[1], device=x.device) >= _lengths(x)[:, None]
        h = self.encoder(self.embed(x) + self.pos[: x.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return {"z": self.to_code((h * keep).sum(1) / keep.sum(1))}

    def decode_logits(self, z, inputs):
        t = inputs.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=inputs.device)
        h = self.decoder(self.embed(inputs) + self.pos[:t], self.from_code(z)[:, None], tgt_mask=mask,
                         tgt_is_causal=True)
        return self.out(self.norm(h))
