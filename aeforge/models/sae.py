"""Sparse autoencoders on language-model activations (card: shared/methods/scgc_sae_jepa.md §2-7).

One `SparseAutoencoder` per hookpoint; `SAEBank` (the aeforge model) holds one per matched site and
takes batches `x: (B, S, d)` (S sites of width d). Activations (`activation=`):

- `relu`      ReLU + L1 (Towards Monosemanticity / Kissane attention-output SAEs): f = ReLU(W(x - b_pre) + b)
- `topk`      Gao et al.: keep the k largest pre-activations, ReLU the kept values
- `batchtopk` Bussmann et al.: keep the k*B largest entries of the batch's ReLU codes; at eval a global
              threshold θ (EMA of the smallest kept value) replaces the batch selection
- `jumprelu`  Rajamanoharan et al.: f = π·H(π - θ), θ = exp(t) learnt with straight-through estimators
- `top_afa`   Lee et al.: per-token k* from norm matching (cumulative ‖a_i d_i‖ closest to ‖x - b_dec‖)
- `vsae`      Baker & Li: Gaussian posterior N(μ, σ²) sampled in training, TopK on |z|, KL to N(0, I)
- `gsae`      Olmo et al. (g-SAE): TopK of z(1 + β|W_dec g|) with g = ∂L_LM/∂x from the batch (`grad`);
              falls back to plain TopK when the batch has no gradient (inference)

Fast TopK path (`sparse_kernel: true`, topk / gsae without grad / vsae / top_afa): the encoder is one
GEMM + `torch.topk(sorted=False)`; the backward of the encoder touches only the k (and k_aux) selected
latents (sparse COO product for ∂W_enc, an embedding-bag for ∂x), and the decoder is an embedding-bag
over the k active rows (forward and backward O(N·k·d), never O(N·h·d)). `matmul_dtype: bfloat16` runs
the encoder GEMM in bf16 on either path. The naive dense path (`sparse_kernel: false`) is kept for
reference and tests.

Decoder constraint (`unit_norm_decoder`): a gradient hook on W_dec removes the component of each row's
gradient parallel to the row (before the optimiser sees it) and `on_train_step_end` renormalises rows
after every step. Dead latents: a per-latent counter of tokens since the latent last fired; a latent is
dead after `dead_tokens` tokens (the window is logged in tokens, card 7.5; under DDP the counter counts global
tokens and is merged over ranks every step, see sae_dist.py). AuxK reconstructs the residual from the top
`aux_k` dead pre-activations; `resample_latents` (SAEModule `resample_*`) is the Anthropic alternative.

Export: `save_sparsify` / `load_sparsify` write and read one folder per hookpoint with
`sae.safetensors` (encoder.weight (h, d), encoder.bias (h,), W_dec (h, d), b_dec (d,)) and `cfg.json`
(d_in, num_latents, k, ...), the layout EleutherAI sparsify loads; `save_saelens` writes
`sae_weights.safetensors` (W_enc (d, h), W_dec (h, d), b_enc, b_dec[, threshold]) + `cfg.json`
(d_in, d_sae, architecture, hook_name, ...) for SAELens. See docs/methods/sae.md for the mapping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aeforge.models.base import AutoencoderModel

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "top_afa", "vsae", "gsae")
SPARSE = ("topk", "top_afa", "vsae", "gsae")  # activations whose codes travel as (values, indices)


# -- sparse kernels ------------------------------------------------------------------------------------
class _TopKEncode(torch.autograd.Function):
    """pre = x_c W^T + b; main = top-k of pre (ReLU'd), aux = top-k_aux of pre over dead latents.
    The backward only visits the selected entries: ∂W = Gᵀ x_c with G sparse (N, h) of N·(k + k_aux)
    entries, ∂x_c = G W (embedding-bag), ∂b = column sums of G. `compute_dtype` (bf16): the encoder GEMM
    (the one dense N×h product) runs in that dtype; the selected values and the sparse backward stay fp32."""

    @staticmethod
    def forward(ctx, x_c, weight, bias, k: int, dead, k_aux: int, compute_dtype=None):
        if compute_dtype is None:
            pre = torch.addmm(bias, x_c, weight.t())
        else:
            pre = torch.addmm(bias.to(compute_dtype), x_c.to(compute_dtype), weight.to(compute_dtype).t())
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = vals.float().clamp_min(0)
        if dead is not None and k_aux > 0:
            masked = pre.masked_fill(~dead, float("-inf"))
            aux_vals, aux_idx = masked.topk(k_aux, dim=-1, sorted=False)
            aux_vals = aux_vals.float().clamp_min(0)  # -inf (too few dead latents) and negatives -> 0
        else:
            aux_vals = aux_idx = None
        del pre
        ctx.k_aux = 0 if aux_idx is None else k_aux
        ctx.save_for_backward(x_c, weight, idx, vals, aux_idx, aux_vals)
        if aux_idx is None:
            aux_vals = x_c.new_zeros(x_c.shape[0], 0)
            aux_idx = idx.new_zeros(x_c.shape[0], 0)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, g_idx, g_aux, g_aux_idx):
        x_c, weight, idx, vals, aux_idx, aux_vals = ctx.saved_tensors
        g = g_vals * (vals > 0)
        if ctx.k_aux and g_aux is not None:
            g = torch.cat([g, g_aux * (aux_vals > 0)], 1)
            idx = torch.cat([idx, aux_idx], 1)
        n, kk = idx.shape
        h, d = weight.shape
        gx = gw = gb = None
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gx = F.embedding_bag(idx, weight, per_sample_weights=g.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            rows = torch.arange(n, device=idx.device).repeat_interleave(kk)
            gt = torch.sparse_coo_tensor(
                torch.stack([flat_idx, rows]), flat_g, (h, n), check_invariants=False
            )
            gw = torch.sparse.mm(gt, x_c.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(h, device=g.device, dtype=weight.dtype).index_add_(0, flat_idx, flat_g)
        return gx, gw, gb, None, None, None, None


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j vals[n, j] · w_dec[idx[n, j]]: forward and backward touch only the active rows."""
    if idx.shape[1] == 0:
        return vals.new_zeros(vals.shape[0], w_dec.shape[1])
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals.to(w_dec.dtype), mode="sum")


def top_afa_select(
    acts: torch.Tensor, dec_norms: torch.Tensor, target_norm: torch.Tensor, k_max: int | None = None
):
    """top-AFA selection (card 2.2). acts (N, h) ≥ 0, dec_norms (h,), target_norm (N,).
    Ranks by m_i = (a_i‖d_i‖)², cumulative sums c_k of the top-k, last cumulative entry set to 1e8
    (the official guard: selecting everything is never the accidental best), k* = argmin_k |√c_k − t| + 1.
    Returns (k* (N,), values (N, K), indices (N, K)) with values beyond k* zeroed (K = k_max or h)."""
    h = acts.shape[-1]
    kk = h if k_max is None else min(int(k_max), h)
    mags = (acts * dec_norms).pow(2)
    top_m, idx = mags.topk(kk, dim=-1, sorted=True)
    cum = top_m.cumsum(-1)
    cum[:, -1] = 1e8
    kstar = (cum.sqrt() - target_norm[:, None]).abs().argmin(-1) + 1
    keep = torch.arange(kk, device=acts.device)[None, :] < kstar[:, None]
    vals = acts.gather(-1, idx) * keep
    return kstar, vals, idx


class _JumpReLU(torch.autograd.Function):
    """f = π·H(π − θ); ∂f/∂π = H, ∂f/∂θ = −(θ/ε)K((π−θ)/ε), chained to t with θ = exp(t); K = 1[|u| < ½]."""

    @staticmethod
    def forward(ctx, pre, log_theta, eps: float):
        theta = log_theta.exp()
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((pre - theta).abs() < eps / 2).to(g.dtype)
        g_pre = g * (pre > theta)
        g_theta = (g * (-(theta / eps) * kernel)).sum(0)
        return g_pre, g_theta * theta, None


class _Step(torch.autograd.Function):
    """H(π − θ) with ∂/∂θ = −(1/ε)K((π−θ)/ε) and no gradient to π (the L0 term)."""

    @staticmethod
    def forward(ctx, pre, log_theta, eps: float):
        theta = log_theta.exp()
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        kernel = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        g_theta = (g * (-1.0 / ctx.eps) * kernel).sum(0)
        return None, g_theta * theta, None


# -- one SAE -------------------------------------------------------------------------------------------
class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        d: int,
        n_latents: int,
        activation: str = "topk",
        k: int = 32,
        pre_bias: bool = True,
        input_norm: str = "none",
        unit_norm_decoder: bool = True,
        tied_init: bool = True,
        init_dec_norm: float | None = None,
        aux_k: int = 512,
        dead_tokens: int = 10_000_000,
        sparse_kernel: bool = True,
        matmul_dtype: str | None = None,
        jumprelu_bandwidth: float = 0.001,
        jumprelu_init_threshold: float = 0.001,
        afa_k_max: int | None = None,
        gsae_beta: float = 1.0,
        gsae_grad_norm: bool = True,
        vsae_var_flag: bool = False,
        vsae_sample_fixed_variance: bool = False,
        batchtopk_threshold_beta: float = 0.999,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r}; valid: {list(ACTIVATIONS)}")
        if input_norm not in ("none", "layernorm"):
            raise ValueError(f"model.input_norm={input_norm!r}; valid: ['layernorm', 'none']")
        self.d, self.h, self.activation, self.k = d, n_latents, activation, int(k)
        self.pre_bias, self.input_norm, self.unit_norm_decoder = pre_bias, input_norm, unit_norm_decoder
        self.aux_k, self.dead_tokens, self.sparse_kernel = int(aux_k), int(dead_tokens), sparse_kernel
        self.matmul_dtype = getattr(torch, matmul_dtype) if matmul_dtype else None
        self.jr_eps, self.afa_k_max = jumprelu_bandwidth, afa_k_max
        self.gsae_beta, self.gsae_grad_norm = gsae_beta, gsae_grad_norm
        self.vsae_var_flag, self.vsae_sample_fixed = vsae_var_flag, vsae_sample_fixed_variance
        self.bt_beta = batchtopk_threshold_beta

        w = torch.empty(n_latents, d)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.W_enc = nn.Parameter(w.clone())  # (h, d): row i is latent i's encoder direction
        w_dec = (
            w.clone() if tied_init else nn.init.kaiming_uniform_(torch.empty(n_latents, d), a=math.sqrt(5))
        )
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        if init_dec_norm is not None:
            w_dec = w_dec * init_dec_norm
            if tied_init:
                self.W_enc.data.copy_(w_dec)
        self.W_dec = nn.Parameter(w_dec)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(jumprelu_init_threshold)))
        if activation == "vsae" and vsae_var_flag:
            self.W_sigma = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(n_latents, d), a=math.sqrt(5)))
            self.b_sigma = nn.Parameter(torch.full((n_latents,), -2.0))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        # DDP: the counter update waits for the other ranks' fired masks (sae_dist.sync_dead_counters)
        self.defer_dead_update = False
        self.pending_fired: torch.Tensor | None = None
        self.pending_tokens = 0
        self.register_buffer("threshold", torch.tensor(-1.0))  # BatchTopK inference threshold (<0: unset)
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
    def init_pre_bias(self, x: torch.Tensor, iters: int = 50) -> None:
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

    def _mm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.matmul_dtype is not None:
            return torch.addmm(
                b.to(self.matmul_dtype), x.to(self.matmul_dtype), w.to(self.matmul_dtype).t()
            ).float()
        return torch.addmm(b, x, w.t())

    def pre_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        return self._mm(x_c, self.W_enc, self.b_enc)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x_raw: torch.Tensor, grad: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x_raw (N, d) in the data's (possibly globally scaled) space. Returns targets and outputs in
        the SAE's input space (after the optional per-token layer norm); `recon_raw` is in x_raw's space."""
        x, stats = self._norm_in(x_raw.float())
        x_c = x - self.b_dec if self.pre_bias else x
        out: dict[str, torch.Tensor] = {"x": x}
        n = x.shape[0]
        want_aux = (
            self.training and self.aux_k > 0 and self.activation in ("topk", "top_afa", "batchtopk", "gsae")
        )
        dead = self.dead if want_aux else None
        if dead is not None and not bool(dead.any()):
            dead = None
        k_aux = min(self.aux_k, int(dead.sum())) if dead is not None else 0
        aux = None  # (vals, idx) or dense codes of the dead latents
        act = self.activation

        if act == "topk" or (act == "gsae" and grad is None):
            if self.sparse_kernel:
                vals, idx, av, ai = _TopKEncode.apply(x_c, self.W_enc, self.b_enc, self.k, dead, k_aux,
                                                      self.matmul_dtype)
                if k_aux:
                    aux = (av, ai)
            else:
                pre = self.pre_acts(x_c)
                vals, idx = pre.topk(self.k, dim=-1, sorted=False)
                vals = vals.clamp_min(0)
                if k_aux:
                    av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
                    aux = (av.clamp_min(0), ai)
            out["vals"], out["idx"] = vals, idx
        elif act == "gsae":
            pre = self.pre_acts(x_c)
            z = pre.clamp_min(0)
            g = grad.float()
            if self.gsae_grad_norm:
                g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = (g @ self.W_dec.detach().t()).abs()  # directional gradients ⟨d_i, g⟩
            score = z * (1 + self.gsae_beta * u)
            _, idx = score.topk(self.k, dim=-1, sorted=False)
            out["vals"], out["idx"] = z.gather(-1, idx), idx  # kept values: z (the gradient only re-ranks)
            if k_aux:
                av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
                aux = (av.clamp_min(0), ai)
        elif act == "top_afa":
            pre = self.pre_acts(x_c)
            a = pre.clamp_min(0)
            dec_norms = self.W_dec.norm(dim=1)
            kstar, vals, idx = top_afa_select(
                a.detach(), dec_norms.detach(), x_c.detach().norm(dim=-1), self.afa_k_max
            )
            keep = vals > 0
            out["vals"], out["idx"] = a.gather(-1, idx) * keep, idx
            out["kstar"] = kstar.float()
            out["xc_norm"] = x_c.norm(dim=-1)
            out["f_norm"] = (out["vals"] * dec_norms[idx]).norm(dim=-1)
            if k_aux:
                av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
                aux = (av.clamp_min(0), ai)
        elif act == "vsae":
            mu = self.pre_acts(x_c).clamp_min(0)
            if self.vsae_var_flag:
                log_var = self._mm(x_c, self.W_sigma, self.b_sigma).clamp(-6, 2)
                mu_c = mu.clamp(-10, 10)
                out["kl"] = 0.5 * (mu_c.pow(2) + log_var.exp() - 1 - log_var).sum(-1).mean()
                z = mu + (0.5 * log_var).exp() * torch.randn_like(mu) if self.training else mu
            else:
                out["kl"] = 0.5 * mu.clamp(-10, 10).pow(2).sum(-1).mean()
                z = mu + torch.randn_like(mu) if (self.training and self.vsae_sample_fixed) else mu
            _, idx = z.abs().topk(self.k, dim=-1, sorted=False)
            out["vals"], out["idx"] = z.gather(-1, idx), idx
        elif act == "batchtopk":
            a = self.pre_acts(x_c).clamp_min(0)
            if self.training:
                kb = min(self.k * n, a.numel())
                flat = a.flatten()
                top, pos = flat.topk(kb, sorted=False)
                f = torch.zeros_like(flat).scatter(0, pos, top).view_as(a)
                with torch.no_grad():
                    pos_vals = top[top > 0]
                    if pos_vals.numel():
                        m = pos_vals.min()
                        th = self.threshold
                        self.threshold.copy_(
                            torch.where(th < 0, m, self.bt_beta * th + (1 - self.bt_beta) * m)
                        )
            else:
                th = self.threshold.clamp_min(0)
                f = a * (a > th)
            out["acts"] = f
            if k_aux:
                av, ai = (
                    self.pre_acts(x_c).masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
                )
                aux = (av.clamp_min(0), ai)
        elif act == "jumprelu":
            pre = self.pre_acts(x_c)
            out["acts"] = _JumpReLU.apply(pre, self.log_threshold, self.jr_eps)
            out["l0_ste"] = _Step.apply(pre, self.log_threshold, self.jr_eps).sum(-1)
        else:  # relu
            out["acts"] = self.pre_acts(x_c).clamp_min(0)

        if "idx" in out:
            recon = sparse_decode(out["vals"], out["idx"], self.W_dec) + self.b_dec
            nz = out["vals"] != 0
            out["l0"] = nz.sum(-1).float()
            fired = torch.zeros(self.h, dtype=torch.bool, device=x.device)
            fired[out["idx"][nz]] = True
            dec_norms = self.W_dec.norm(dim=1)
            out["l1"] = (out["vals"].abs() * dec_norms[out["idx"]]).sum(-1)
        else:
            f = out["acts"]
            recon = f @ self.W_dec + self.b_dec
            out["l0"] = (f != 0).sum(-1).float()
            fired = (f != 0).any(0)
            out["l1"] = (f.abs() * self.W_dec.norm(dim=1)).sum(-1)
        out["recon"] = recon
        out["fired"] = fired
        if aux is not None:
            out["aux_recon"] = sparse_decode(aux[0], aux[1], self.W_dec)
        out["recon_raw"] = self._norm_out(recon, stats)
        if self.training:
            with torch.no_grad():
                if self.defer_dead_update:
                    self.pending_fired = fired if self.pending_fired is None else self.pending_fired | fired
                    self.pending_tokens += n
                else:
                    self.apply_fired(fired, n)
        return out

    @torch.no_grad()
    def apply_fired(self, fired: torch.Tensor, tokens: int) -> None:
        self.tokens_since_fired.add_(tokens)
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def codes(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Dense (N, h) latent codes (eval mode selection)."""
        out = self.forward(x_raw)
        if "idx" in out:
            return torch.zeros(x_raw.shape[0], self.h, device=x_raw.device).scatter_(
                1, out["idx"], out["vals"]
            )
        return out["acts"]

    def config_dict(self) -> dict:
        return {
            "d_in": self.d,
            "num_latents": self.h,
            "activation": self.activation,
            "k": self.k,
            "pre_bias": self.pre_bias,
            "input_norm": self.input_norm,
            "unit_norm_decoder": self.unit_norm_decoder,
        }


# -- the aeforge model: one SAE per site ----------------------------------------------------------------
class RemoteSite(nn.Module):
    """Stands in for a site whose SAE lives on another rank (site-parallel training): no parameters, so the
    state_dict keys of the sites a rank does hold keep their global index (`saes.<site>.*`)."""


class SAEBank(AutoencoderModel):
    """One SparseAutoencoder per hookpoint. Batches: `x` (B, S, d) or (B, d); optional `grad` (same shape,
    g-SAE). `n_latents` wins over `expansion` (n_latents = expansion · d)."""

    modality = "activations"

    def __init__(
        self,
        input_shape,
        expansion: int = 32,
        n_latents: int | None = None,
        init_pre_bias: bool = False,
        **sae_kwargs,
    ):
        super().__init__()
        shape = tuple(input_shape)
        self.n_sites, self.d = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
        self.n_latents = int(n_latents) if n_latents else int(expansion) * self.d
        self.init_pre_bias_flag = init_pre_bias
        self.saes = nn.ModuleList(
            SparseAutoencoder(self.d, self.n_latents, **sae_kwargs) for _ in range(self.n_sites)
        )
        self.site_names: list[str] = [f"site{i}" for i in range(self.n_sites)]
        self.progress = 0.0  # fraction of training done (KL warm-up); set by SAEModule

    @staticmethod
    def _sites(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.ndim == 2 else x

    def local_sites(self) -> list[tuple[int, SparseAutoencoder]]:
        """(site index, SAE) of the sites held here (all of them unless `keep_sites` dropped some)."""
        return [(s, m) for s, m in enumerate(self.saes) if isinstance(m, SparseAutoencoder)]

    def keep_sites(self, sites: list[int]) -> None:
        for s in range(self.n_sites):
            if s not in sites:
                self.saes[s] = RemoteSite()

    def forward(self, batch) -> dict:
        """x: (B, n_sites, d), or (B, n_local, d) holding only this bank's sites in order."""
        x = self._sites(batch["x"])
        g = batch.get("grad")
        g = self._sites(g) if g is not None else None
        local = self.local_sites()
        col = [s if x.shape[1] == self.n_sites else j for j, (s, _) in enumerate(local)]
        sites = [sae(x[:, c], None if g is None else g[:, c]) for c, (_, sae) in zip(col, local)]
        recon = torch.stack([o["recon_raw"] for o in sites], 1)
        return {
            "sites": sites,
            "progress": self.progress,
            "recon": recon.view_as(batch["x"]) if len(local) == self.n_sites else recon,
        }

    def encode(self, batch) -> torch.Tensor:
        x = self._sites(batch["x"])
        return torch.cat([sae.codes(x[:, s]) for s, sae in self.local_sites()], 1)

    def reconstruct(self, batch) -> torch.Tensor:
        return self(batch)["recon"]

    def on_train_step_end(self, step: int, total: int) -> None:
        for _, sae in self.local_sites():
            if sae.unit_norm_decoder:
                sae.renormalize_decoder()

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()}


# -- interop ---------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return name.replace("/", "_").replace("*", "x")


def save_sparsify(bank: SAEBank, out_dir: str | Path, hookpoints: list[str] | None = None) -> list[Path]:
    """sparsify layout: <out_dir>/<hookpoint>/{sae.safetensors, cfg.json}. Folded: sparsify has no input
    layer norm and always subtracts b_dec before the encoder (our pre_bias)."""
    from safetensors.torch import save_file

    names = hookpoints or bank.site_names
    paths = []
    for s, sae in bank.local_sites():
        name = names[s]
        d = Path(out_dir) / _safe(name)
        d.mkdir(parents=True, exist_ok=True)
        b_enc = sae.b_enc.detach()
        if not sae.pre_bias:  # fold: W(x) + b = W(x - b_dec) + (b + W b_dec)
            b_enc = b_enc + sae.W_enc.detach() @ sae.b_dec.detach()
        tensors = {
            "encoder.weight": sae.W_enc.detach(),
            "encoder.bias": b_enc,
            "W_dec": sae.W_dec.detach(),
            "b_dec": sae.b_dec.detach(),
        }
        save_file({k: v.contiguous().cpu().float() for k, v in tensors.items()}, str(d / "sae.safetensors"))
        cfg = {
            "d_in": sae.d,
            "num_latents": sae.h,
            "k": sae.k,
            "expansion_factor": sae.h // sae.d,
            "normalize_decoder": sae.unit_norm_decoder,
            "multi_topk": False,
            "skip_connection": False,
            "activation": "topk" if sae.activation in SPARSE else sae.activation,
            "hookpoint": name,
            "aeforge": sae.config_dict(),
        }
        (d / "cfg.json").write_text(json.dumps(cfg, indent=2))
        paths.append(d)
    return paths


def load_sparsify(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read one sparsify-format folder (cfg.json + sae.safetensors) as a TopK SparseAutoencoder."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae.safetensors"), device=str(device))
    d_in = int(cfg.get("d_in", t["W_dec"].shape[1]))
    h = int(cfg.get("num_latents") or t["W_dec"].shape[0])
    extra = cfg.get("aeforge", {})
    sae = SparseAutoencoder(
        d_in,
        h,
        activation="topk",
        k=int(cfg.get("k", 32)),
        pre_bias=True,
        input_norm=extra.get("input_norm", "none"),
        unit_norm_decoder=False,
        aux_k=0,
    )
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"])
        sae.b_enc.copy_(t["encoder.bias"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
    return sae.to(device).eval()


def save_saelens(bank: SAEBank, out_dir: str | Path, hookpoints: list[str] | None = None) -> list[Path]:
    """SAELens layout: <out_dir>/<hookpoint>/{sae_weights.safetensors, cfg.json}; W_enc is (d, h) there."""
    from safetensors.torch import save_file

    names = hookpoints or bank.site_names
    arch = {"relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    paths = []
    for s, sae in bank.local_sites():
        name = names[s]
        d = Path(out_dir) / _safe(name)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            "W_enc": sae.W_enc.detach().t(),
            "W_dec": sae.W_dec.detach(),
            "b_enc": sae.b_enc.detach(),
            "b_dec": sae.b_dec.detach(),
        }
        if sae.activation == "jumprelu":
            tensors["threshold"] = sae.log_threshold.detach().exp()
        if sae.activation == "batchtopk":
            tensors["threshold"] = torch.full((sae.h,), float(sae.threshold.clamp_min(0)))
        save_file(
            {k: v.contiguous().cpu().float() for k, v in tensors.items()}, str(d / "sae_weights.safetensors")
        )
        cfg = {
            "architecture": arch.get(sae.activation, "topk"),
            "d_in": sae.d,
            "d_sae": sae.h,
            "activation_fn_kwargs": {"k": sae.k} if sae.activation in SPARSE else {},
            "apply_b_dec_to_input": sae.pre_bias,
            "hook_name": name,
            "dtype": "float32",
            "normalize_activations": "layer_norm" if sae.input_norm == "layernorm" else "none",
            "aeforge": sae.config_dict(),
        }
        (d / "cfg.json").write_text(json.dumps(cfg, indent=2))
        paths.append(d)
    return paths


# -- dead-latent resampling (Anthropic / Kissane, card 7.1 and 5.4) ----------------------------------------
@torch.no_grad()
def resample_latents(
    sae: SparseAutoencoder, dead: torch.Tensor, inputs: torch.Tensor | None, optimizer=None, enc_scale: float = 0.2
) -> None:
    """Re-initialise the latents in `dead` (bool (h,)) on `inputs` (n_dead, d; SAE input space, one token
    per dead latent, drawn with probability rising with its loss): decoder row = unit (x - b_dec), encoder
    row = the encoder's input direction × enc_scale × mean alive encoder norm, b_enc = 0, so each latent
    fires on the token it was drawn from. Adam moments of those rows are zeroed (stale moments would kick
    the fresh rows) and their dead counters restart. inputs=None: only the optimiser state and counters
    (a DDP rank whose weights are then broadcast from rank 0)."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return
    if inputs is not None:
        alive = ~dead
        inputs = inputs.to(sae.W_dec.dtype)
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if alive.any() else sae.W_enc.new_tensor(1.0)
        dec_norm = (
            sae.W_dec[alive].norm(dim=1).mean() if alive.any() and not sae.unit_norm_decoder else 1.0
        )
        x_c = inputs - sae.b_dec
        sae.W_dec[idx] = F.normalize(x_c, dim=1) * dec_norm
        enc_in = x_c if sae.pre_bias else inputs
        sae.W_enc[idx] = F.normalize(enc_in, dim=1) * enc_norm * enc_scale
        sae.b_enc[idx] = 0
    sae.tokens_since_fired[idx] = 0
    if optimizer is not None:
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == sae.h:  # moments; not Adam's step
                    v[idx] = 0


# -- training loop ----------------------------------------------------------------------------------------
def _module_base():
    from aeforge.modules.base import AEModule

    return AEModule


class SAEModule(_module_base()):
    """AEModule for SAEs: the sites' names come from the data, b_dec may start at the geometric median,
    the KL warm-up sees the training progress, training logs L0 / FVU / dead fraction, and at the end the
    headline metrics (`l0, fvu, mse, cosine, dead_frac, dense_frac, ce_recovered, kl`, prefixed by hookpoint
    when there are several) go into metrics.json unprefixed; the SAEs are exported (sparsify layout).

    Multi-process (aeforge/models/sae_dist.py): under plain DDP the dead-latent counters are merged over
    ranks every step; `distribute_sites` (with `trainer=ddp_sites`) puts each site's SAE on one rank and
    routes that site's activations of the global batch to it.

    Resampling (`resample_every` steps, at most `resample_max` times): latents whose firing frequency over
    the last `resample_window` steps is <= `resample_dead_freq` are re-initialised on tokens of the last
    `resample_batches` batches drawn with probability ∝ (per-token squared error)^`resample_loss_power`
    (see `resample_latents`)."""

    def __init__(
        self,
        *args,
        final_metrics: bool = True,
        eval_tokens: int = 16384,
        ce_sequences: int = 16,
        eval_batch_size: int = 4096,
        export: str | None = "sparsify",
        distribute_sites: bool = False,
        resample_every: int | None = None,
        resample_max: int = 4,
        resample_window: int = 12500,
        resample_batches: int = 100,
        resample_dead_freq: float = 1e-6,
        resample_enc_scale: float = 0.2,
        resample_loss_power: float = 2.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if export not in (None, "sparsify", "saelens"):
            raise ValueError(f"module.export={export!r}; valid: null, sparsify, saelens")
        if resample_every is not None and resample_every < 1:
            raise ValueError(f"module.resample_every={resample_every}; a positive step count or null")
        self.final_metrics, self.eval_tokens, self.ce_sequences, self.export = (
            final_metrics,
            eval_tokens,
            ce_sequences,
            export,
        )
        self.eval_batch_size = eval_batch_size
        self.distribute_sites = distribute_sites
        self.site_parallel = False  # set in setup when there is more than one rank
        self.resample_every, self.resample_max, self.resample_window = resample_every, resample_max, resample_window
        self.resample_batches, self.resample_dead_freq = resample_batches, resample_dead_freq
        self.resample_enc_scale, self.resample_loss_power = resample_enc_scale, resample_loss_power
        self.resamples_done = 0
        self._fires: dict[int, torch.Tensor] = {}  # per site: firing counts since the window opened
        self._fire_tokens = 0
        self._pool: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per site: candidate tokens, keys

    def setup(self, stage: str) -> None:
        from aeforge.models.sae_dist import SiteParallelStrategy, owned_sites, rank_world

        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "hookpoint_names"):
            self.model.site_names = list(dm.hookpoint_names)
        rank, world = rank_world()
        strategy = self.trainer.strategy if self.trainer is not None else None
        if world > 1 and self.distribute_sites:
            if not isinstance(strategy, SiteParallelStrategy):
                raise ValueError("module.distribute_sites=true needs trainer=ddp_sites (DDP without its wrapper)")
            if self.model.n_sites < world:
                raise ValueError(f"module.distribute_sites: {self.model.n_sites} sites for {world} ranks")
            self.model.keep_sites(owned_sites(self.model.n_sites, rank, world))
            self.site_parallel = True
        elif world > 1 and isinstance(strategy, SiteParallelStrategy):
            raise ValueError("trainer=ddp_sites does not average gradients: set module.distribute_sites=true")
        elif world > 1:
            for _, sae in self.model.local_sites():
                sae.defer_dead_update = True

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if self.model.init_pre_bias_flag and self.global_step == 0:
            x = dm.normalize(dm.val_activations()[:8192].to(self.device))
            x = x.unsqueeze(1) if x.ndim == 2 else x
            for s, sae in self.model.local_sites():
                sae.init_pre_bias(x[:, s])

    def on_train_start(self) -> None:
        super().on_train_start()  # the loader position and RNG states of a resumed run
        # a resumed resampling window was loaded on the CPU, before the module moved to its device
        self._fires = {s: f.to(self.device) for s, f in self._fires.items()}
        self._pool = {s: (x.to(self.device), k.to(self.device)) for s, (x, k) in self._pool.items()}

    def on_train_batch_start(self, batch, batch_idx):
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        self.model.progress = min(self.global_step / total, 1.0)
        if self.resample_every:
            # at the start of a step, after any checkpoint of the previous one: a run resumed from a
            # checkpoint written at a resampling step still resamples there
            self._maybe_resample()

    def _step(self, batch) -> dict[str, torch.Tensor]:
        if self.site_parallel and self.training:
            from aeforge.models.sae_dist import exchange_sites

            n = self.model.n_sites
            batch = {**batch, "x": exchange_sites(self.model._sites(batch["x"]), n)}
            if "grad" in batch:
                batch["grad"] = exchange_sites(self.model._sites(batch["grad"]), n)
        out = self.model(batch)
        losses = self.objective(out, batch)
        sites = out["sites"]
        if self.training and self.resample_every and self.resamples_done < self.resample_max:
            self._track_for_resampling(sites)
        with torch.no_grad():
            losses["l0"] = sum(o["l0"].mean() for o in sites) / len(sites)
            fvu = [
                (o["recon"] - o["x"]).pow(2).sum() / (o["x"] - o["x"].mean(0)).pow(2).sum().clamp_min(1e-12)
                for o in sites
            ]
            losses["fvu"] = sum(fvu) / len(fvu)
            saes = [sae for _, sae in self.model.local_sites()]
            losses["dead_frac"] = sum(sae.dead.float().mean() for sae in saes) / len(saes)
        return losses

    # -- resampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _track_for_resampling(self, sites: list[dict]) -> None:
        """Firing counts for the dead test, and a weighted reservoir (keys log(u)/w, the largest kept: a
        draw without replacement ∝ w) of at most h candidate tokens from the last `resample_batches` steps."""
        collect = self.resample_every - self.global_step % self.resample_every <= self.resample_batches
        for (s, sae), o in zip(self.model.local_sites(), sites):
            if "idx" in o:
                counts = torch.bincount(o["idx"][o["vals"] != 0], minlength=sae.h)
            else:
                counts = (o["acts"] != 0).sum(0)
            self._fires[s] = self._fires[s] + counts if s in self._fires else counts
            if collect:
                w = (o["recon"] - o["x"]).pow(2).sum(-1).float().pow(self.resample_loss_power)
                keys = torch.rand_like(w).log() / w
                x = o["x"].detach()
                if s in self._pool:
                    x, keys = torch.cat([self._pool[s][0], x]), torch.cat([self._pool[s][1], keys])
                top = keys.topk(min(sae.h, len(keys))).indices
                self._pool[s] = (x[top], keys[top])
        self._fire_tokens += len(sites[0]["x"])

    def _reset_resampling_window(self) -> None:
        self._fires, self._fire_tokens = {}, 0

    @torch.no_grad()
    def _maybe_resample(self) -> None:
        import logging

        import torch.distributed as dist

        from aeforge.models.sae_dist import rank_world

        every, step = self.resample_every, self.global_step
        if self.resamples_done >= self.resample_max or step == 0:
            return
        if self.resample_window < every and step % every == every - self.resample_window:
            self._reset_resampling_window()  # the dead test looks at the last resample_window steps only
        if step % every:
            return
        rank, world = rank_world()
        ddp = world > 1 and not self.site_parallel  # replicas: same dead set, rank 0's tokens, broadcast
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        for s, sae in self.model.local_sites():
            fires = self._fires.get(s, torch.zeros(sae.h, dtype=torch.long, device=self.device))
            counts = torch.cat([fires, fires.new_tensor([self._fire_tokens])])
            if ddp:
                dist.all_reduce(counts)
            dead = counts[:-1].float() / max(int(counts[-1]), 1) <= self.resample_dead_freq
            n_dead = int(dead.sum())
            if n_dead == 0:
                continue
            inputs = None
            if (rank == 0 or not ddp) and s in self._pool:
                x, keys = self._pool[s]
                order = keys.argsort(descending=True)
                inputs = x[order[torch.arange(n_dead, device=order.device) % len(order)]]
            resample_latents(sae, dead, inputs, opt, self.resample_enc_scale)
            if ddp:
                for p in (sae.W_enc, sae.W_dec, sae.b_enc):
                    dist.broadcast(p.data, 0)
            logging.getLogger("aeforge").info(
                "step %d: resampled %d dead latents of %s", step, n_dead, self.model.site_names[s]
            )
        self.resamples_done += 1
        self._reset_resampling_window()
        self._pool = {}

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        if not self.site_parallel:
            from aeforge.models.sae_dist import sync_dead_counters

            sync_dead_counters(sae for _, sae in self.model.local_sites())

    # -- checkpoints ----------------------------------------------------------------------------------
    # Called on every rank (Lightning builds the checkpoint everywhere, rank 0 writes it): the gathers below
    # are collectives.
    def on_save_checkpoint(self, checkpoint):
        from pytorch_lightning.utilities import move_data_to_device

        from aeforge.models.sae_dist import gather_to_zero, rank_world

        super().on_save_checkpoint(checkpoint)
        checkpoint["sae_resamples_done"] = self.resamples_done
        if self.resample_every:
            window = self._resampling_window_state()
            if window is not None:
                checkpoint["sae_resampling_window"] = window
        if self.site_parallel:  # rank 0 writes the file: hand it every rank's sites and optimiser states
            mine = {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith("model.saes.")}
            optim = [move_data_to_device(self.trainer.strategy.optimizer_state(o), "cpu")
                     for o in self.trainer.optimizers]
            parts = gather_to_zero((mine, optim))
            if parts is not None:
                for weights, _ in parts:
                    checkpoint["state_dict"].update(weights)
                checkpoint["sae_site_optimizer_states"] = [states for _, states in parts]  # index: rank
                checkpoint["sae_site_world"] = rank_world()[1]

    def on_load_checkpoint(self, checkpoint):
        from aeforge.models.sae_dist import rank_world

        super().on_load_checkpoint(checkpoint)
        self.resamples_done = int(checkpoint.get("sae_resamples_done", 0))
        rank, world = rank_world()
        written_by = checkpoint.get("sae_site_world")
        if self.site_parallel != (written_by is not None) or (self.site_parallel and written_by != world):
            were = f"a site-parallel run on {written_by} ranks" if written_by else "a run without site parallelism"
            now = f"a site-parallel run on {world} ranks" if self.site_parallel else "one without site parallelism"
            fix = (f"resume with trainer=ddp_sites module.distribute_sites=true on {written_by} ranks"
                   if written_by else "resume without module.distribute_sites")
            raise ValueError(f"resume: the checkpoint was written by {were}, this is {now}; {fix} (its weights "
                             "load into any layout with fit=false resume=<ckpt>)")
        if self.site_parallel:  # this rank's sites and its own optimiser state (same site assignment)
            held = {f"model.saes.{s}." for s, _ in self.model.local_sites()}
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items()
                if not k.startswith("model.saes.") or any(k.startswith(h) for h in held)
            }
            checkpoint["optimizer_states"] = checkpoint["sae_site_optimizer_states"][rank]
        window = checkpoint.get("sae_resampling_window")
        if window is not None:
            self._load_resampling_window(window, rank, world)

    def _resampling_window_state(self) -> dict | None:
        """The open resampling window of every rank, merged on rank 0 (None elsewhere): firing counts
        (summed over DDP replicas, whose tokens differ; site parallel: each owner's sites), the token
        count, and the candidate pool (DDP: rank 0's, the one a resampling draws from)."""
        from aeforge.models.sae_dist import gather_to_zero, rank_world

        local = {"fires": {s: f.cpu() for s, f in self._fires.items()}, "tokens": self._fire_tokens,
                 "pool": {s: (x.cpu(), k.cpu()) for s, (x, k) in self._pool.items()}}
        parts = gather_to_zero(local)
        if parts is None:
            return None
        replicas = rank_world()[1] > 1 and not self.site_parallel
        fires: dict[int, torch.Tensor] = {}
        for part in parts:
            for s, f in part["fires"].items():
                fires[s] = fires[s] + f if s in fires else f
        return {
            "fires": fires,
            "tokens": sum(p["tokens"] for p in parts) if replicas else parts[0]["tokens"],
            "pool": parts[0]["pool"] if replicas else {s: v for p in parts for s, v in p["pool"].items()},
        }

    def _load_resampling_window(self, window: dict, rank: int, world: int) -> None:
        # DDP replicas: rank 0 takes the merged counts, the others start from zero, so the all-reduce at the
        # next resampling sums to the same totals as without the interruption
        held = {s for s, _ in self.model.local_sites()}
        if world > 1 and not self.site_parallel and rank != 0:
            self._fires, self._fire_tokens, self._pool = {}, 0, {}
            return
        self._fires = {s: f for s, f in window["fires"].items() if s in held}
        self._fire_tokens = int(window["tokens"])
        self._pool = {s: v for s, v in window["pool"].items() if s in held}

    # -- end of fit: export and metrics --------------------------------------------------------------
    def on_train_end(self) -> None:
        if not self.site_parallel and not self.trainer.is_global_zero:
            return
        from aeforge.eval.sae import collect_site_metrics, report_site_metrics
        from aeforge.models.sae_dist import gather_to_zero

        out = Path(self.trainer.default_root_dir)
        names = list(self.model.site_names)
        # site parallel: each owner writes its own sites
        if self.export == "sparsify":
            save_sparsify(self.model, out / "sae", names)
        elif self.export == "saelens":
            save_saelens(self.model, out / "sae", names)
        if not self.final_metrics:
            return
        per_site = collect_site_metrics(
            self.model,
            self.trainer.datamodule,
            self.device,
            self.eval_tokens,
            self.eval_batch_size,
            self.ce_sequences,
        )
        if self.site_parallel:
            parts = gather_to_zero(per_site)
            if parts is None:
                return
            per_site = [site for part in parts for site in part]
        m = report_site_metrics(per_site, histogram=out / "feature_density.png", zf_plot=out / "zf_plot.png")
        self.trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in m.items()})
