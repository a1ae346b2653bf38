"""A frozen text encoder that turns captions into (B, L, D) token features for cross-attention (VideoVAE+).

Sources:
- `hf:<hub id or local folder>` (or a bare path / hub id): any Hugging Face model `AutoModel` loads, with its
  own `AutoTokenizer`; an encoder-decoder checkpoint (T5, Flan-T5: VideoVAE+'s `google/flan-t5-large`) is cut
  to its encoder, so the decoder's weights are never run.
- `random:<width>x<layers>`: a BERT-like encoder with random weights drawn from a fixed seed, tokenised by UTF-8
  bytes. Needs no download; tests and CPU recipes use it. Its embeddings still separate captions (a caption
  changes the features), but carry no pretrained meaning: say so wherever a result depends on it.

The encoder never trains: parameters have `requires_grad=False`, it stays in eval mode (`FrozenModule`) and its
weights are kept out of the enclosing model's state dict (they are rebuilt from `source`; a 770 M-parameter T5
copied into every checkpoint would dominate it).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from aeforge.nn.frozen import FrozenModule

SCHEMES = ("hf:<hub id or path>", "random:<width>x<layers>")
_RANDOM = re.compile(r"random:(\d+)x(\d+)")
# byte ids are shifted past the specials
PAD, CLS, SEP, BYTE0 = 0, 1, 2, 3


class ByteTokenizer:
    """[CLS] utf-8 bytes [SEP], padded with 0: a tokenizer with no vocabulary file (for `random:` encoders)."""

    vocab_size = 256 + BYTE0

    def __call__(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        rows = [[CLS, *(b + BYTE0 for b in t.encode("utf-8")[: max_length - 2]), SEP] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD] * (n - len(r)) for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def _random_encoder(width: int, layers: int, max_length: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    heads = max(1, width // 32) if width % 32 == 0 else 1
    cfg = BertConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=max_length, pad_token_id=PAD,
    )
    with torch.random.fork_rng(devices=[]):  # the same weights in every process, whatever the run's seed
        torch.manual_seed(seed)
        return BertModel(cfg, add_pooling_layer=False)


class FrozenTextEncoder(FrozenModule):
    """`forward(captions) -> (tokens (B, L, dim), mask (B, L) bool, True = a real token)`; `dim` is the width."""

    def __init__(self, source: str, max_length: int = 100, seed: int = 0):
        super().__init__()
        if max_length < 3:
            raise ValueError(f"text encoder max_length must be >= 3 (room for one token), got {max_length}")
        self.source, self.max_length = source, max_length
        m = _RANDOM.fullmatch(source)
        if m:
            width, layers = int(m.group(1)), int(m.group(2))
            if width < 1 or layers < 1:
                raise ValueError(f"text encoder source {source!r}: width and layers must be >= 1")
            self.encoder = _random_encoder(width, layers, max_length, seed)
            self.tokenizer = ByteTokenizer()
        elif source.startswith("random"):
            raise ValueError(f"text encoder source {source!r}: a random encoder is written random:<width>x<layers>, "
                             f"e.g. random:32x2; valid sources: {SCHEMES}")
        else:
            self.encoder, self.tokenizer = self._load_hf(source.removeprefix("hf:"))
        self.dim = int(self.encoder.config.hidden_size if hasattr(self.encoder.config, "hidden_size")
                       else self.encoder.config.d_model)
        self.requires_grad_(False)
        self.eval()
        # rebuilt from `source`, so not part of checkpoints (see the module docstring)
        self._register_state_dict_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_ignore_own_missing)

    @staticmethod
    def _load_hf(name: str):
        if not name:
            raise ValueError(f"text encoder source is empty; valid sources: {SCHEMES}")
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name)
        except OSError as e:
            raise ValueError(
                f"text encoder source {name!r} could not be loaded ({str(e).splitlines()[0]}); give a local folder "
                f"with the model and tokenizer files, a hub id reachable from here, or random:<width>x<layers>"
            ) from None
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5: only the encoder's states are the condition
        return model, tokenizer

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(captions, self.max_length)
        return dict(self.tokenizer(captions, max_length=self.max_length, truncation=True, padding="longest",
                                   return_tensors="pt"))

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("FrozenTextEncoder expects a list of caption strings (batch['caption'])")
        device = next(self.encoder.parameters()).device
        tok = {k: v.to(device) for k, v in self.tokenize(list(captions)).items()}
        out = self.encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return out.last_hidden_state.float(), tok["attention_mask"].bool()


def _drop_own_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[k]


def _ignore_own_missing(module, incompatible):
    own = [k for k in incompatible.missing_keys if ".encoder." in k or k.startswith("encoder.")]
    for k in own:
        if _is_text_encoder_key(module, k):
            incompatible.missing_keys.remove(k)


def _is_text_encoder_key(module, key: str) -> bool:
    # the post-hook sees keys relative to the root module being loaded; ours end in a parameter of self.encoder
    names = {n for n, _ in module.encoder.named_parameters()} | {n for n, _ in module.encoder.named_buffers()}
    return any(key.endswith("encoder." + n) for n in names)
