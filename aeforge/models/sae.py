"""Sparse autoencoders on language-model activations (card: shared/methods/scgc_sae_jepa.md §2-7).

One `SparseAutoencoder` per hookpoint; `SAEBank` (the aeforge model) holds one per matched site and
takes batches `x: (B, S, d)` (S sites of width d). The activation (ReLU, TopK, BatchTopK, JumpReLU,
top-AFA, vSAE, g-SAE) is an object of aeforge/models/sae_activations.py chosen by `_target_` under
`model.activation`; the autograd kernels are in aeforge/nn/sparse_ops.py, the sparsify / SAELens export in
sae_export.py, dead-latent resampling in sae_resample.py, the training loop in aeforge/modules/sae.py.

Fast TopK path (`activation.sparse_kernel: true`, TopK and g-SAE without a gradient): the encoder is one
GEMM + `torch.topk(sorted=False)`; the backward of the encoder touches only the k (and k_aux) selected
latents, and every fixed-width selection (TopK, g-SAE, vSAE, top-AFA) is decoded by an embedding-bag over
the k active rows (forward and backward O(N·k·d), never O(N·h·d)). `matmul_dtype: bfloat16` runs the
encoder GEMM in bf16 on either path.

Decoder constraint (`unit_norm_decoder`): a gradient hook on W_dec removes the component of each row's
gradient parallel to the row (before the optimiser sees it) and `on_train_step_end` renormalises rows
after every step. Dead latents: a per-latent counter of tokens since the latent last fired; a latent is
dead after `dead_tokens` tokens (the window is logged in tokens, card 7.5; under DDP the counter counts
global tokens and is merged over ranks after every step, see sae_dist.py). AuxK reconstructs the residual
from the top `aux_k` dead pre-activations; resampling (sae_resample.py) is the Anthropic alternative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.models.sae_activations import Activation, Codes
from aeforge.models.sae_dist import rank_world, sync_dead_counters
from aeforge.nn.sparse_ops import sparse_decode


@dataclass(kw_only=True)
class SiteOutput(Codes):
    """One SAE's forward pass over N tokens: the activation's `Codes` (vals/idx or acts, and the extras of
    its activation) plus what every SAE derives from them. Spaces: `x` and `recon` are in the SAE's input
    space (after the optional per-token layer norm), `recon_raw` in the space of the tokens passed in."""

    x: torch.Tensor  # (N, d) the reconstruction target
    recon: torch.Tensor  # (N, d)
    recon_raw: torch.Tensor  # (N, d) the layer norm undone
    l0: torch.Tensor  # (N,) active latents per token
    l1: torch.Tensor  # (N,) Σ_i |f_i| ‖d_i‖
    fired: torch.Tensor  # (h,) bool: latents active on any of the tokens
    dead_frac: torch.Tensor  # () fraction of latents dead by the training counter, after this batch
    aux_recon: torch.Tensor | None = None  # (N, d) AuxK: the residual reconstructed from dead latents

    def firing_counts(self, h: int) -> torch.Tensor:
        """(h,) int64: tokens each latent was active on."""
        if self.idx is not None:
            return torch.bincount(self.idx[self.vals != 0], minlength=h)
        return (self.acts != 0).sum(0)

    def dense_codes(self, h: int) -> torch.Tensor:
        """(N, h) codes, zeros where a selection left a latent out."""
        if self.idx is not None:
            return torch.zeros(self.idx.shape[0], h, device=self.idx.device).scatter_(1, self.idx, self.vals)
        return self.acts


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        d: int,
        n_latents: int,
        activation: Activation,
        pre_bias: bool = True,
        input_norm: str = "none",
        unit_norm_decoder: bool = True,
        tied_init: bool = True,
        init_dec_norm: float | None = None,
        aux_k: int = 512,
        dead_tokens: int = 10_000_000,
        matmul_dtype: str | None = None,
    ):
        super().__init__()
        if not isinstance(activation, Activation):
            raise TypeError(
                f"model.activation={activation!r}: an activation object, e.g. "
                "{_target_: aeforge.models.sae_activations.TopK, k: 32} (see conf/model/sae_*.yaml)"
            )
        if input_norm not in ("none", "layernorm"):
            raise ValueError(f"model.input_norm={input_norm!r}; valid: ['layernorm', 'none']")
        self.d, self.h, self.activation = d, n_latents, activation
        self.pre_bias, self.input_norm, self.unit_norm_decoder = pre_bias, input_norm, unit_norm_decoder
        self.aux_k, self.dead_tokens = int(aux_k), int(dead_tokens)
        self.matmul_dtype = getattr(torch, matmul_dtype) if matmul_dtype else None

        w = torch.empty(n_latents, d)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.W_enc = nn.Parameter(w.clone())  # (h, d): row i is latent i's encoder direction
        w_dec = w.clone() if tied_init else nn.init.kaiming_uniform_(torch.empty(n_latents, d), a=math.sqrt(5))
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        if init_dec_norm is not None:
            w_dec = w_dec * init_dec_norm
            if tied_init:
                self.W_enc.data.copy_(w_dec)
        self.W_dec = nn.Parameter(w_dec)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d))
        activation.add_parameters(self)
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        # BatchTopK's inference threshold (<0: unset); on every SAE so checkpoint keys do not depend on the
        # activation
        self.register_buffer("threshold", torch.tensor(-1.0))
        # DDP: fired masks waiting to be merged over ranks (sae_dist.sync_dead_counters)
        self.pending_fired: torch.Tensor | None = None
        self.pending_tokens = 0
        if unit_norm_decoder:
            self.W_dec.register_hook(self._remove_parallel_grad)

    # -- decoder constraint ------------------------------------------------------------------------
    def _remove_parallel_grad(self, grad: torch.Tensor) -> torch.Tensor:
        w = self.W_dec.detach()
        w_unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return grad - (grad * w_unit).sum(1, keepdim=True) * w_unit

    @torch.no_grad()
    def renormalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fit_pre_bias(self, x: torch.Tensor, iters: int = 50) -> None:
        """b_dec ← geometric median of a sample (Weiszfeld iterations), in the SAE's input space."""
        x = self._norm_in(x.float())[0]
        m = x.mean(0)
        for _ in range(iters):
            w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-6)
            m = (w[:, None] * x).sum(0) / w.sum()
        self.b_dec.copy_(m)

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def dead(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def _norm_in(self, x: torch.Tensor):
        if self.input_norm == "layernorm":
            mu = x.mean(-1, keepdim=True)
            sd = x.std(-1, keepdim=True)
            return (x - mu) / (sd + 1e-5), (mu, sd)
        return x, None

    @staticmethod
    def _norm_out(x: torch.Tensor, stats) -> torch.Tensor:
        if stats is None:
            return x
        mu, sd = stats
        return x * (sd + 1e-5) + mu

    def affine(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x wᵀ + b, in `matmul_dtype` when set (result in fp32)."""
        if self.matmul_dtype is not None:
            return torch.addmm(b.to(self.matmul_dtype), x.to(self.matmul_dtype), w.to(self.matmul_dtype).t()).float()
        return torch.addmm(b, x, w.t())

    def pre_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        return self.affine(x_c, self.W_enc, self.b_enc)

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self, x_raw: torch.Tensor, grad: torch.Tensor | None = None, defer_dead_update: bool = False
    ) -> SiteOutput:
        """x_raw (N, d) in the data's (possibly globally scaled) space; `grad` (N, d) for g-SAE. In training
        the dead-latent counters advance, or with `defer_dead_update` wait for `sync_dead_counters`."""
        x, stats = self._norm_in(x_raw.float())
        x_c = x - self.b_dec if self.pre_bias else x
        n = x.shape[0]
        dead = self.dead if self.training and self.aux_k > 0 and self.activation.uses_aux else None
        if dead is not None and not bool(dead.any()):
            dead = None
        k_aux = min(self.aux_k, int(dead.sum())) if dead is not None else 0
        codes = self.activation.encode(self, x_c, grad, dead, k_aux)

        if codes.idx is not None:
            recon = sparse_decode(codes.vals, codes.idx, self.W_dec) + self.b_dec
            nz = codes.vals != 0
            l0 = nz.sum(-1).float()
            fired = torch.zeros(self.h, dtype=torch.bool, device=x.device)
            fired[codes.idx[nz]] = True
            l1 = (codes.vals.abs() * self.W_dec.norm(dim=1)[codes.idx]).sum(-1)
        else:
            f = codes.acts
            recon = f @ self.W_dec + self.b_dec
            l0 = (f != 0).sum(-1).float()
            fired = (f != 0).any(0)
            l1 = (f.abs() * self.W_dec.norm(dim=1)).sum(-1)
        aux_recon = sparse_decode(codes.aux[0], codes.aux[1], self.W_dec) if codes.aux is not None else None
        if self.training:
            with torch.no_grad():
                if defer_dead_update:
                    self.pending_fired = fired if self.pending_fired is None else self.pending_fired | fired
                    self.pending_tokens += n
                else:
                    self.apply_fired(fired, n)
        return SiteOutput(
            **vars(codes), x=x, recon=recon, recon_raw=self._norm_out(recon, stats), l0=l0, l1=l1, fired=fired,
            dead_frac=self.dead.float().mean(), aux_recon=aux_recon,
        )

    @torch.no_grad()
    def apply_fired(self, fired: torch.Tensor, tokens: int) -> None:
        self.tokens_since_fired.add_(tokens)
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def codes(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Dense (N, h) latent codes (eval mode selection)."""
        return self.forward(x_raw).dense_codes(self.h)


# -- the aeforge model: one SAE per site ----------------------------------------------------------------
class RemoteSite(nn.Module):
    """Stands in for a site whose SAE lives on another rank (site-parallel training): no parameters, so the
    state_dict keys of the sites a rank does hold keep their global index (`saes.<site>.*`)."""


class SAEBank(AutoencoderModel):
    """One SparseAutoencoder per hookpoint, all with the same `activation` and settings. Batches: `x`
    (B, S, d) or (B, d); optional `grad` (same shape, g-SAE). `n_latents` wins over `expansion`
    (n_latents = expansion · d); `init_pre_bias`: b_dec starts at the geometric median of held-out data
    (the training module calls `fit_pre_bias`)."""

    modality = "activations"

    def __init__(
        self,
        input_shape,
        activation: Activation,
        expansion: int = 32,
        n_latents: int | None = None,
        init_pre_bias: bool = False,
        pre_bias: bool = True,
        input_norm: str = "none",
        unit_norm_decoder: bool = True,
        tied_init: bool = True,
        init_dec_norm: float | None = None,
        aux_k: int = 512,
        dead_tokens: int = 10_000_000,
        matmul_dtype: str | None = None,
    ):
        super().__init__()
        shape = tuple(input_shape)
        self.n_sites, self.d = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
        self.n_latents = int(n_latents) if n_latents else int(expansion) * self.d
        self.init_pre_bias = init_pre_bias
        settings = dict(
            pre_bias=pre_bias, input_norm=input_norm, unit_norm_decoder=unit_norm_decoder, tied_init=tied_init,
            init_dec_norm=init_dec_norm, aux_k=aux_k, dead_tokens=dead_tokens, matmul_dtype=matmul_dtype,
        )
        self.saes = nn.ModuleList(
            SparseAutoencoder(self.d, self.n_latents, activation, **settings) for _ in range(self.n_sites)
        )

    @staticmethod
    def as_sites(x: torch.Tensor) -> torch.Tensor:
        """(B, S, d) as it is; (B, d) as one site (B, 1, d)."""
        return x.unsqueeze(1) if x.ndim == 2 else x

    def local_sites(self) -> list[tuple[int, SparseAutoencoder]]:
        """(site index, SAE) of the sites held here (all of them unless `keep_sites` dropped some)."""
        return [(s, m) for s, m in enumerate(self.saes) if isinstance(m, SparseAutoencoder)]

    def keep_sites(self, sites: list[int]) -> None:
        """Site-parallel training: drop the SAEs of the sites other ranks own."""
        for s in range(self.n_sites):
            if s not in sites:
                self.saes[s] = RemoteSite()

    @property
    def site_parallel(self) -> bool:
        return len(self.local_sites()) < self.n_sites

    def _merges_over_ranks(self) -> bool:
        """DDP replicas train the same SAEs on different tokens: their dead counters must count global tokens."""
        return self.training and not self.site_parallel and rank_world()[1] > 1

    @torch.no_grad()
    def fit_pre_bias(self, x: torch.Tensor) -> None:
        """b_dec of each held site ← the geometric median of x (N, S, d) or (N, d) at that site."""
        x = self.as_sites(x)
        for s, sae in self.local_sites():
            sae.fit_pre_bias(x[:, s])

    def forward(self, batch) -> dict:
        """x: (B, n_sites, d), or (B, n_local, d) holding only this bank's sites in order. Returns `sites`
        (a SiteOutput per held site) and `recon` (like x)."""
        x = self.as_sites(batch["x"])
        g = batch.get("grad")
        g = self.as_sites(g) if g is not None else None
        local = self.local_sites()
        col = [s if x.shape[1] == self.n_sites else j for j, (s, _) in enumerate(local)]
        defer = self._merges_over_ranks()
        sites = [sae(x[:, c], None if g is None else g[:, c], defer) for c, (_, sae) in zip(col, local)]
        recon = torch.stack([o.recon_raw for o in sites], 1)
        return {"sites": sites, "recon": recon.view_as(batch["x"]) if len(local) == self.n_sites else recon}

    def encode(self, batch) -> torch.Tensor:
        x = self.as_sites(batch["x"])
        return torch.cat([sae.codes(x[:, s]) for s, sae in self.local_sites()], 1)

    def reconstruct(self, batch) -> torch.Tensor:
        return self(batch)["recon"]

    def on_train_step_end(self, step: int, total: int) -> None:
        for _, sae in self.local_sites():
            if sae.unit_norm_decoder:
                sae.renormalize_decoder()
        # the counters deferred by DDP replicas this step, summed over ranks (a no-op when nothing waits)
        sync_dead_counters(sae for _, sae in self.local_sites())

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()}
