"""Frozen tokenizers: images -> (B, grid_h, grid_w) code ids on a ViT's patch grid, the token target of CAE
(and BEiT). The `tokenizer` config group points here.

FrozenVQTokenizer: loads a `model=vq_tokenizer` checkpoint (self-describing: the constructor arguments
travel in the state dict; the trainable `VQTokenizer` is in aeforge/models/vq.py). FrozenDalleTokenizer:
OpenAI's DALL-E dVAE encoder. Any other tokenizer plugs into CAE the same way: an nn.Module with
`vocab_size` and `forward(x) -> (B, h, w)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.checkpoints import UnsafeCheckpointError, load_checkpoint
from aeforge.models.base import model_state_dict
from aeforge.models.vq import VQTokenizer
from aeforge.nn.frozen import FrozenModule

log = logging.getLogger("aeforge")


def load_vq_tokenizer(path: str) -> VQTokenizer:
    """A trained VQTokenizer from a `model=vq_tokenizer` checkpoint (Lightning `.ckpt` or a bare state dict),
    rebuilt from the constructor arguments stored in it."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint not found: {path} (train one: python train.py experiment=vq_tokenizer_cifar10, "
            f"then pass tokenizer.checkpoint=<run dir>/checkpoints/last.ckpt)"
        )
    state = model_state_dict(load_checkpoint(file, what="tokenizer.checkpoint"))
    config = state.get("_extra_state")
    if not isinstance(config, Mapping) or "num_codes" not in config:
        raise ValueError(f"{path} is not a model=vq_tokenizer checkpoint (no VQTokenizer '_extra_state' in it)")
    model = VQTokenizer(**{**config, "input_shape": tuple(config["input_shape"])})
    model.load_state_dict(state)
    return model


class FrozenVQTokenizer(FrozenModule):
    """A trained VQTokenizer, frozen: images (normalised with data_mean/data_std) -> (B, gh, gw) code ids.

    The tokenizer re-normalises the input to the statistics it was trained with (stored in its checkpoint),
    so it can be trained on one data config and used on another with the same images.
    checkpoint=null is refused unless allow_random=true (set by debug=smoke): then a randomly initialised
    tokenizer with `patch_size` / `num_codes` is built on first use, and a warning says so."""

    def __init__(
        self,
        checkpoint: str | None = None,
        allow_random: bool = False,
        data_mean: list[float] | None = None,
        data_std: list[float] | None = None,
        patch_size: int = 4,
        num_codes: int = 512,
    ):
        super().__init__()
        if checkpoint is None and not allow_random:
            raise ValueError(
                "tokenizer.checkpoint is null: CAE's token target needs a trained tokenizer. Train one with "
                "`python train.py experiment=vq_tokenizer_cifar10` and pass "
                "tokenizer.checkpoint=<run dir>/checkpoints/last.ckpt"
            )
        self.data_mean, self.data_std = data_mean, data_std
        self.random_spec = (patch_size, num_codes)
        self.model: VQTokenizer | None = None
        if checkpoint is not None:
            self._set(load_vq_tokenizer(str(checkpoint)))
        else:
            log.warning(
                "tokenizer.checkpoint=null with allow_random=true (debug=smoke sets it): the CAE token targets come "
                "from a RANDOMLY INITIALISED frozen VQ tokenizer (patch %d, %d codes). Its codes mean nothing; "
                "use this for plumbing checks only, never for results.", patch_size, num_codes,
            )
        self.vocab_size = self.model.vocab_size if self.model is not None else num_codes

    def _set(self, model: VQTokenizer) -> None:
        self.model = model.eval().requires_grad_(False)
        c = model.input_shape[0]
        mean, std = model.config.get("data_mean"), model.config.get("data_std")
        if self.data_mean is not None and len(self.data_mean) != c:
            raise ValueError(f"the tokenizer was trained on {c}-channel images, the data has {len(self.data_mean)}")
        scale, shift = torch.ones(1, c, 1, 1), torch.zeros(1, c, 1, 1)
        if None not in (mean, std, self.data_mean, self.data_std):
            # x_tok = (x * s_data + m_data - m_tok) / s_tok: the data's normalisation swapped for the tokenizer's
            m_d, s_d, m_t, s_t = (torch.tensor(v, dtype=torch.float32).view(1, c, 1, 1)
                                  for v in (self.data_mean, self.data_std, mean, std))
            scale, shift = s_d / s_t, (m_d - m_t) / s_t
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:  # random tokenizer: its input shape is only known now
            p, k = self.random_spec
            self._set(VQTokenizer(tuple(x.shape[1:]), patch_size=p, num_codes=k).to(x.device))
        return self.model.tokenize(x * self.scale + self.shift)

    @torch.no_grad()
    def decode_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw) ids -> image in the *data's* normalisation (for CAE's reconstruction grids)."""
        return (self.model.decode_codes(ids) - self.shift) / self.scale


class FrozenDalleTokenizer(FrozenModule):
    """The DALL-E dVAE encoder (OpenAI's `dall_e` package, 8192 codes), frozen: CAE's / BEiT's token target.

    Images (normalised with data_mean/data_std) are mapped back to [0, 1], resized to `view_size` (the CAE
    recipe's 112 px second view of a 224 px crop; null: 8 × the ViT patch grid, 8 being the encoder's
    downsampling), passed through DALL-E's `map_pixels` (x -> 0.8 x + 0.1) and encoded; the arg-max logit
    per position is the code, on a (view_size / 8)² grid that must equal the ViT patch grid.

    `path`: OpenAI's `encoder.pkl` (a pickled module; download it yourself, nothing is fetched here; read only
    with `trust_pickle=True`, since unpickling a module runs code) or a state dict of a `dall_e.Encoder` (its
    sizes are read off the weights). The CAE recipe resizes with Lanczos on PIL
    images; here the view is made on the device with antialiased bicubic interpolation."""

    def __init__(
        self,
        path: str | None = None,
        allow_random: bool = False,
        trust_pickle: bool = False,
        data_mean: list[float] | None = None,
        data_std: list[float] | None = None,
        patch_size: int = 16,
        view_size: int | None = None,
    ):
        super().__init__()
        try:
            import dall_e
        except ImportError as e:
            raise ImportError("tokenizer=dalle needs OpenAI's dall_e package: pip install -e '.[dalle]'") from e
        if path is None and not allow_random:
            raise ValueError("tokenizer.path is null: point it at the DALL-E encoder weights (encoder.pkl, "
                             "https://cdn.openai.com/dall-e/encoder.pkl, downloaded beforehand)")
        if path is None:
            log.warning("tokenizer.path=null with allow_random=true (debug=smoke sets it): the DALL-E encoder is "
                        "RANDOMLY INITIALISED; its codes mean nothing (plumbing checks only)")
            encoder = dall_e.Encoder()
        else:
            encoder = load_dalle_encoder(str(path), trust_pickle)
        self.encoder = encoder.eval().requires_grad_(False)
        self.vocab_size = int(encoder.vocab_size)
        self.patch_size, self.view_size = patch_size, view_size
        mean = torch.tensor(data_mean if data_mean is not None else [0.0, 0.0, 0.0]).view(1, -1, 1, 1)
        std = torch.tensor(data_std if data_std is not None else [1.0, 1.0, 1.0]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        grid = (h // self.patch_size, w // self.patch_size)
        size = (self.view_size, self.view_size) if self.view_size else (grid[0] * 8, grid[1] * 8)
        pixels = (x.float() * self.std + self.mean).clamp(0, 1)
        if pixels.shape[1] == 1:  # grey data: the encoder takes RGB
            pixels = pixels.expand(-1, 3, -1, -1)
        view = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        logits = self.encoder(0.8 * view + 0.1)  # dall_e.map_pixels with its eps = 0.1
        return logits.argmax(1)


def load_dalle_encoder(path: str, trust_pickle: bool = False) -> nn.Module:
    """A state dict of a dall_e.Encoder (read with weights_only=True, like every checkpoint), or OpenAI's pickled
    `encoder.pkl`: a pickled module can run code when read, so it is read in full only with trust_pickle
    (aeforge's one exception to weights_only; it needs the dall_e package to unpickle)."""
    import dall_e

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer.path={path}: no such file (the DALL-E encoder weights, encoder.pkl)")
    try:
        obj = load_checkpoint(path, what="tokenizer.path")
    except UnsafeCheckpointError as e:
        if not trust_pickle:
            raise ValueError(
                f"tokenizer.path={path} is a pickled module, not a state dict: reading it runs the code the pickle "
                f"names, so aeforge refuses it by default ({e}). OpenAI's encoder.pkl is such a file; if yours "
                f"came from https://cdn.openai.com/dall-e/encoder.pkl (or you made it), allow it with "
                f"tokenizer.trust_pickle=true"
            ) from None
        log.warning("tokenizer.trust_pickle=true: reading the full pickle %s (it can run code)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):  # sizes read off the weights: input conv (n_hid, 3, 7, 7), output (vocab, ...)
        try:
            n_hid, channels = obj["blocks.input.w"].shape[:2]
            vocab = obj["blocks.output.conv.w"].shape[0]
        except KeyError as e:
            raise ValueError(f"tokenizer.path={path}: a state dict without DALL-E encoder keys ({e})") from None
        blocks = {k.split(".")[2] for k in obj if k.startswith("blocks.group_1.block_")}
        encoder = dall_e.Encoder(n_hid=int(n_hid), n_blk_per_group=len(blocks), input_channels=int(channels),
                                 vocab_size=int(vocab))
        encoder.load_state_dict(obj)
        return encoder
    if not isinstance(obj, nn.Module) or not hasattr(obj, "vocab_size"):
        raise ValueError(f"tokenizer.path={path} holds a {type(obj).__name__}, not a DALL-E encoder")
    return obj
