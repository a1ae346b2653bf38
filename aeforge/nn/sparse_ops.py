"""Autograd kernels of sparse autoencoders (aeforge/models/sae.py; card: shared/methods/scgc_sae_jepa.md §2-7).

- `topk_encode`: encoder GEMM + top-k (and AuxK's top-k over dead latents) whose backward visits only the
  selected entries (sparse COO product for ∂W, an embedding-bag for ∂x)
- `sparse_decode`: Σ_j vals[n, j] · W_dec[idx[n, j]] as an embedding-bag (O(N·k·d) both ways)
- `top_afa_select`: top-AFA's per-token k* by norm matching
- `jumprelu` / `heaviside_step`: JumpReLU's gate and its L0, with straight-through gradients to the
  (log-)threshold (rectangle kernel of bandwidth ε)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
            gt = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_g, (h, n), check_invariants=False)
            gw = torch.sparse.mm(gt, x_c.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(h, device=g.device, dtype=weight.dtype).index_add_(0, flat_idx, flat_g)
        return gx, gw, gb, None, None, None, None


def topk_encode(
    x_c: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vals (N, k), idx (N, k), aux_vals (N, k_aux), aux_idx (N, k_aux)) of ReLU(x_c Wᵀ + b): the top k
    latents, and the top k_aux among `dead` (h,) bool (empty (N, 0) without dead latents)."""
    return _TopKEncode.apply(x_c, weight, bias, k, dead, k_aux, compute_dtype)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j vals[n, j] · w_dec[idx[n, j]]: forward and backward touch only the active rows."""
    if idx.shape[1] == 0:
        return vals.new_zeros(vals.shape[0], w_dec.shape[1])
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals.to(w_dec.dtype), mode="sum")


def top_afa_select(acts: torch.Tensor, dec_norms: torch.Tensor, target_norm: torch.Tensor, k_max: int | None = None):
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


class _Threshold(torch.autograd.Function):
    """θ = exp(t). `step=False`: f = π·H(π − θ) with ∂f/∂π = H, ∂f/∂θ = −(θ/ε)K((π−θ)/ε) (JumpReLU);
    `step=True`: H(π − θ) with ∂/∂θ = −(1/ε)K((π−θ)/ε) and no gradient to π (the L0 term). Both chained to
    t through θ; K = 1[|u| < ½]."""

    @staticmethod
    def forward(ctx, pre, log_theta, eps: float, step: bool):
        theta = log_theta.exp()
        ctx.save_for_backward(pre, theta)
        ctx.eps, ctx.step = eps, step
        return (pre > theta).to(pre.dtype) if step else pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((pre - theta).abs() < eps / 2).to(g.dtype)
        if ctx.step:
            return None, (g * (-1.0 / eps) * kernel).sum(0) * theta, None, None
        g_theta = (g * (-(theta / eps) * kernel)).sum(0)
        return g * (pre > theta), g_theta * theta, None, None


def jumprelu(pre: torch.Tensor, log_threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """π·H(π − exp(t)), straight-through gradient to t."""
    return _Threshold.apply(pre, log_threshold, eps, False)


def heaviside_step(pre: torch.Tensor, log_threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """H(π − exp(t)) (per entry 0/1), straight-through gradient to t only."""
    return _Threshold.apply(pre, log_threshold, eps, True)
