"""A small VQ tokenizer the framework trains itself (`model=vq_tokenizer`); its frozen form for CAE's token
target (`tokenizer=vq`) is `FrozenVQTokenizer` in aeforge/targets/tokenizers.py.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.models.mae import checked_dims


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
        c, h, w = checked_dims(input_shape, patch_size)
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
