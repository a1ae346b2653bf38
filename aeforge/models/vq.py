"""A small VQ tokenizer the framework trains itself (`model=vq_tokenizer`), and its frozen form for CAE's
token target (`tokenizer=vq`).

VQTokenizer: conv encoder that downsamples by `patch_size` (one code per ViT patch), a K x D vector
quantiser, conv decoder; loss = pixel MSE + codebook + commitment terms (`objective=vq`).

Quantiser choice (documented in docs/methods/cae.md): codebook and commitment *losses* with the
straight-through estimator, on l2-normalised (cosine) codes in a low dimension (D = 32), as ViT-VQGAN
(Yu et al., 2022) proposes to keep the codebook in use. Losses rather than EMA updates because they
need no update path outside the optimiser: DDP averages their gradients like any other, resume restores
them with the optimiser state, and the terms are logged like every other loss. Unit-norm codes make the
nearest-code search depend on direction only, so the encoder's output scale cannot drift away from the
codebook and strand most codes. Cosine codes alone still left two thirds of a 512-code book unused on
MNIST, so codes no position chose for `restart_dead_every` steps are moved onto random encoder outputs of
the current batch (measured, 300 steps on MNIST: usage 5 % plain, 33 % cosine, 97 % cosine + restarts).

FrozenVQTokenizer: loads a `model=vq_tokenizer` checkpoint (self-describing: the constructor arguments
travel in the state dict) and maps images to (B, grid_h, grid_w) code ids. Any other tokenizer (e.g. the
DALL-E dVAE) plugs into CAE the same way: an nn.Module with `vocab_size` and `forward(x) -> (B, h, w)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel, model_state_dict
from aeforge.nn.frozen import FrozenModule

log = logging.getLogger("aeforge")


def strides(factor: int) -> list[int]:
    """Split a downsampling factor into stride-2 stages plus at most one odd stage (7 -> [7], 12 -> [2, 2, 3])."""
    if factor < 1:
        raise ValueError(f"model.patch_size must be >= 1, got {factor}")
    out = []
    while factor % 2 == 0:
        out.append(2)
        factor //= 2
    return out + ([factor] if factor > 1 else [])


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


def down(dim: int, s: int) -> nn.Module:
    # even strides overlap their windows (kernel 2s) so neighbouring codes see shared context
    return nn.Conv2d(dim, dim, 2 * s, stride=s, padding=s // 2) if s % 2 == 0 else nn.Conv2d(dim, dim, s, stride=s)


def up(dim: int, s: int) -> nn.Module:
    if s % 2 == 0:
        return nn.ConvTranspose2d(dim, dim, 2 * s, stride=s, padding=s // 2)
    return nn.ConvTranspose2d(dim, dim, s, stride=s)


class VectorQuantizer(nn.Module):
    """Nearest of K codes (D-d) per position; cosine distance when `normalize` (inputs and codes on the unit
    sphere). Returns ids and the straight-through quantised vectors; the codebook and commitment losses
    are objective terms (`aeforge.objectives.vq`) on outputs `z_e` and `z_q`."""

    def __init__(self, num_codes: int, code_dim: int, normalize: bool = True):
        super().__init__()
        self.num_codes, self.code_dim, self.normalize = num_codes, code_dim, normalize
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))
        if not normalize:  # unnormalised codes start at the scale of a fresh encoder's outputs
            self.codebook.data.mul_(0.1)

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1) if self.normalize else self.codebook

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, N, D) -> ids (B, N), z_e (B, N, D) (normalised input), z_q (B, N, D) (chosen codes)."""
        z_e = F.normalize(z, dim=-1) if self.normalize else z
        book = self.codes()
        flat = z_e.reshape(-1, self.code_dim).float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.float().t() + book.float().pow(2).sum(1)
        ids = dist.argmin(1).view(z.shape[:-1])
        return ids, z_e, F.embedding(ids, book)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codes())


class VQTokenizer(AutoencoderModel):
    """outputs: recon (like x), codes (B, gh, gw), z_e / z_q (B, gh*gw, D) for the VQ loss terms.

    data_mean / data_std record the normalisation of the training inputs; they are stored in the
    checkpoint so a consumer on other data can re-normalise (FrozenVQTokenizer does)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        patch_size: int = 4,
        hidden_dim: int = 64,
        num_res_blocks: int = 1,
        num_codes: int = 512,
        code_dim: int = 32,
        normalize: bool = True,
        restart_dead_every: int = 0,
        data_mean: list[float] | None = None,
        data_std: list[float] | None = None,
    ):
        super().__init__()
        c, h, w = input_shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"model.patch_size={patch_size} does not divide the data's image size {h}x{w}")
        self.input_shape, self.patch_size = tuple(input_shape), patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.vocab_size = num_codes
        self.restart_dead_every = restart_dead_every
        self.config = {
            "input_shape": list(input_shape), "patch_size": patch_size, "hidden_dim": hidden_dim,
            "num_res_blocks": num_res_blocks, "num_codes": num_codes, "code_dim": code_dim, "normalize": normalize,
            "data_mean": list(data_mean) if data_mean is not None else None,
            "data_std": list(data_std) if data_std is not None else None,
        }
        stages = strides(patch_size)
        enc: list[nn.Module] = [nn.Conv2d(c, hidden_dim, 3, padding=1)]
        for s in stages:
            enc += [nn.GELU(), down(hidden_dim, s)]
        enc += [ResBlock(hidden_dim) for _ in range(num_res_blocks)] + [nn.GELU(), nn.Conv2d(hidden_dim, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(num_codes, code_dim, normalize)
        dec: list[nn.Module] = [nn.Conv2d(code_dim, hidden_dim, 3, padding=1)]
        dec += [ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        for s in reversed(stages):
            dec += [nn.GELU(), up(hidden_dim, s)]
        dec += [nn.GELU(), nn.Conv2d(hidden_dim, c, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # per-code assignment counts since the last restart check (saved, so a resumed run restarts the same codes)
        self.register_buffer("code_hits", torch.zeros(num_codes))
        self._last_z: torch.Tensor | None = None

    # the constructor arguments travel in the state dict, so a checkpoint alone rebuilds the tokenizer
    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        mine = self.config["num_codes"]
        if state and state.get("num_codes") != mine:
            raise ValueError(f"the checkpoint's tokenizer has {state.get('num_codes')} codes, this one {mine}")

    # -- pieces -------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor):
        z = self.encoder(x)  # (B, D, gh, gw)
        b, d, gh, gw = z.shape
        ids, z_e, z_q = self.quantizer(z.flatten(2).transpose(1, 2))
        return ids.view(b, gh, gw), z_e, z_q

    def decode_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw) code ids -> image in the training normalisation."""
        q = self.quantizer.lookup(ids).permute(0, 3, 1, 2)
        return self.decoder(q)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)[0]

    # -- contract -----------------------------------------------------------------------------------
    def forward(self, batch):
        x = batch["x"]
        ids, z_e, z_q = self.quantize(x)
        st = z_e + (z_q - z_e).detach()  # straight-through: the decoder's gradient reaches the encoder
        b, gh, gw = ids.shape
        recon = self.decoder(st.transpose(1, 2).reshape(b, -1, gh, gw))
        if self.training and self.restart_dead_every:
            with torch.no_grad():
                self.code_hits += torch.bincount(ids.flatten(), minlength=self.vocab_size).to(self.code_hits)
                self._last_z = z_e.detach().reshape(-1, z_e.shape[-1])
        return {"recon": recon, "codes": ids, "z_e": z_e, "z_q": z_q}

    def encode(self, batch):
        """Features for probes: the quantised code vectors of the whole grid, flattened (B, gh*gw*D)."""
        _, _, z_q = self.quantize(batch["x"])
        return z_q.flatten(1)

    @torch.no_grad()
    def on_train_step_end(self, step: int, total: int) -> None:
        """Dead-code restart: every `restart_dead_every` steps, codes chosen by no position since the last
        check are moved onto random encoder outputs of the latest batch (rank 0's, broadcast under DDP
        so every replica keeps the same codebook)."""
        if not self.restart_dead_every or self._last_z is None or (step + 1) % self.restart_dead_every:
            return
        dead = (self.code_hits == 0).nonzero().flatten()
        if len(dead):
            z = self._last_z
            picks = z[torch.randint(len(z), (len(dead),), device=z.device)]
            self.quantizer.codebook.data[dead] = picks.to(self.quantizer.codebook.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.quantizer.codebook.data, src=0)  # every rank, or it deadlocks
        self.code_hits.zero_()


def load_vq_tokenizer(path: str) -> VQTokenizer:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint not found: {path} (train one: python train.py experiment=vq_tokenizer_cifar10, "
            f"then pass tokenizer.checkpoint=<run dir>/checkpoints/last.ckpt)"
        )
    state = model_state_dict(torch.load(file, map_location="cpu", weights_only=True))
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

    `path`: OpenAI's `encoder.pkl` (a pickled module; download it yourself, nothing is fetched here) or a
    state dict of a `dall_e.Encoder` (its sizes are read off the weights). The CAE recipe resizes with Lanczos on PIL
    images; here the view is made on the device with antialiased bicubic interpolation."""

    def __init__(
        self,
        path: str | None = None,
        allow_random: bool = False,
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
            encoder = load_dalle_encoder(str(path))
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


def load_dalle_encoder(path: str) -> nn.Module:
    """OpenAI's pickled `encoder.pkl` (needs the dall_e package to unpickle; torch >= 2.6 loads only
    weights by default, so this reads the full pickle: load only files you trust) or a state dict."""
    import dall_e

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer.path={path}: no such file (the DALL-E encoder weights, encoder.pkl)")
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
