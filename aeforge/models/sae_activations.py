"""SAE activations: how pre-activations become codes. Chosen by `_target_` under `model.activation` (like
MAE's `masking`), each with its own typed arguments, so the config check refuses a misspelt key.

- `ReLU`       ReLU + L1 (Towards Monosemanticity / Kissane attention-output SAEs): f = ReLU(W(x - b_pre) + b)
- `TopK`       Gao et al.: keep the k largest pre-activations, ReLU the kept values
- `BatchTopK`  Bussmann et al.: keep the k*B largest entries of the batch's ReLU codes; at eval a global
               threshold θ (EMA of the smallest kept value) replaces the batch selection
- `JumpReLU`   Rajamanoharan et al.: f = π·H(π - θ), θ = exp(t) learnt with straight-through estimators
- `TopAFA`     Lee et al.: per-token k* from norm matching (cumulative ‖a_i d_i‖ closest to ‖x - b_dec‖)
- `VSAE`       Baker & Li: Gaussian posterior N(μ, σ²) sampled in training, TopK on |z|, KL to N(0, I)
- `GSAE`       Olmo et al. (g-SAE): TopK of z(1 + β|W_dec g|) with g = ∂L_LM/∂x from the batch (`grad`);
               falls back to plain TopK when the batch has no gradient (inference)

An activation holds only its hyperparameters (one instance serves every site of a bank). The parameters
it needs (JumpReLU's thresholds, vSAE's variance head) it registers on the SAE in `add_parameters`, so
checkpoint keys stay `saes.<site>.<name>` whatever the activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from aeforge.nn.sparse_ops import heaviside_step, jumprelu, top_afa_select, topk_encode

if TYPE_CHECKING:
    from aeforge.models.sae import SparseAutoencoder


@dataclass(kw_only=True)
class Codes:
    """An activation's codes for N tokens. Either a fixed-width selection (`vals`, `idx`) or dense `acts`."""

    vals: torch.Tensor | None = None  # (N, K) selected values (zeros allowed: ReLU'd or beyond top-AFA's k*)
    idx: torch.Tensor | None = None  # (N, K) their latent indices
    acts: torch.Tensor | None = None  # (N, h) dense codes (ReLU, JumpReLU, BatchTopK)
    aux: tuple[torch.Tensor, torch.Tensor] | None = None  # AuxK: (vals, idx) of the top dead pre-activations
    kl: torch.Tensor | None = None  # vSAE: KL(q(z|x) ‖ N(0, I)), batch mean (scalar)
    l0_ste: torch.Tensor | None = None  # JumpReLU: (N,) L0 with straight-through gradients to the thresholds
    kstar: torch.Tensor | None = None  # top-AFA: (N,) k* per token (float)
    xc_norm: torch.Tensor | None = None  # top-AFA: (N,) ‖x − b_dec‖, the selection's target
    f_norm: torch.Tensor | None = None  # top-AFA: (N,) ‖Σ_i f_i d_i‖ proxy ‖f̃‖ = ‖(f_i ‖d_i‖)_i‖


def dead_topk(pre: torch.Tensor, dead: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK's selection: the k_aux largest pre-activations among the dead latents, ReLU'd."""
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
    return vals.clamp_min(0), idx


class Activation:
    """`name`: the activation's name in exports; `sparse`: codes are a fixed-width (vals, idx) selection;
    `uses_aux`: AuxK applies (the SAE passes the dead mask); `k`: the per-token budget, if there is one."""

    name: ClassVar[str]
    sparse: ClassVar[bool] = False
    uses_aux: ClassVar[bool] = False
    k: int | None = None

    def __init__(self) -> None:
        pass  # an explicit signature: the config check refuses any key for an activation without arguments

    def add_parameters(self, sae: SparseAutoencoder) -> None:
        """Register the parameters this activation needs on `sae` (none by default)."""

    def encode(
        self, sae: SparseAutoencoder, x_c: torch.Tensor, grad: torch.Tensor | None, dead: torch.Tensor | None,
        k_aux: int,
    ) -> Codes:
        """Codes of x_c (N, d), the SAE's centred input. `grad` (N, d): ∂L_LM/∂x when the batch has it;
        `dead` (h,) bool and `k_aux` > 0 when AuxK should select among the dead latents."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ReLU(Activation):
    name = "relu"

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        return Codes(acts=sae.pre_acts(x_c).clamp_min(0))


class TopK(Activation):
    """`sparse_kernel`: the encoder is one GEMM + `topk(sorted=False)` whose backward touches only the k
    (and k_aux) selected latents; false runs the dense reference path (tests)."""

    name = "topk"
    sparse = True
    uses_aux = True

    def __init__(self, k: int = 32, sparse_kernel: bool = True):
        self.k, self.sparse_kernel = int(k), sparse_kernel

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        if self.sparse_kernel:
            vals, idx, aux_vals, aux_idx = topk_encode(x_c, sae.W_enc, sae.b_enc, self.k, dead, k_aux,
                                                       sae.matmul_dtype)
            return Codes(vals=vals, idx=idx, aux=(aux_vals, aux_idx) if k_aux else None)
        pre = sae.pre_acts(x_c)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return Codes(vals=vals.clamp_min(0), idx=idx, aux=dead_topk(pre, dead, k_aux) if k_aux else None)


class GSAE(TopK):
    """`beta`: weight of the directional gradient in the selection score (unverified in the card: sweep it);
    `grad_norm`: normalise g per token first. Kept values are z: the gradient only re-ranks."""

    name = "gsae"

    def __init__(self, k: int = 32, beta: float = 1.0, grad_norm: bool = True, sparse_kernel: bool = True):
        super().__init__(k, sparse_kernel)
        self.beta, self.grad_norm = beta, grad_norm

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        if grad is None:
            return super().encode(sae, x_c, grad, dead, k_aux)
        pre = sae.pre_acts(x_c)
        z = pre.clamp_min(0)
        g = grad.float()
        if self.grad_norm:
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u = (g @ sae.W_dec.detach().t()).abs()  # directional gradients ⟨d_i, g⟩
        _, idx = (z * (1 + self.beta * u)).topk(self.k, dim=-1, sorted=False)
        return Codes(vals=z.gather(-1, idx), idx=idx, aux=dead_topk(pre, dead, k_aux) if k_aux else None)


class TopAFA(Activation):
    """`k_max`: cap on the ranked prefix (the official code sorts all h; null = h)."""

    name = "top_afa"
    sparse = True
    uses_aux = True

    def __init__(self, k_max: int | None = None):
        self.k_max = k_max

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        pre = sae.pre_acts(x_c)
        a = pre.clamp_min(0)
        dec_norms = sae.W_dec.norm(dim=1)
        kstar, vals, idx = top_afa_select(a.detach(), dec_norms.detach(), x_c.detach().norm(dim=-1), self.k_max)
        vals = a.gather(-1, idx) * (vals > 0)
        return Codes(
            vals=vals,
            idx=idx,
            aux=dead_topk(pre, dead, k_aux) if k_aux else None,
            kstar=kstar.float(),
            xc_norm=x_c.norm(dim=-1),
            f_norm=(vals * dec_norms[idx]).norm(dim=-1),
        )


class VSAE(Activation):
    """μ = ReLU(W x + b); `var_flag`: a learnt log-variance head, z = μ + σε in training; else z = μ, or
    μ + ε with `sample_fixed_variance` (card 4.8.1). TopK on |z| keeping signed values."""

    name = "vsae"
    sparse = True

    def __init__(self, k: int = 32, var_flag: bool = False, sample_fixed_variance: bool = False):
        self.k, self.var_flag, self.sample_fixed_variance = int(k), var_flag, sample_fixed_variance

    def add_parameters(self, sae) -> None:
        if self.var_flag:
            w = nn.init.kaiming_uniform_(torch.empty(sae.h, sae.d), a=math.sqrt(5))
            sae.W_sigma = nn.Parameter(w)
            sae.b_sigma = nn.Parameter(torch.full((sae.h,), -2.0))

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        mu = sae.pre_acts(x_c).clamp_min(0)
        if self.var_flag:
            log_var = sae.affine(x_c, sae.W_sigma, sae.b_sigma).clamp(-6, 2)
            kl = 0.5 * (mu.clamp(-10, 10).pow(2) + log_var.exp() - 1 - log_var).sum(-1).mean()
            z = mu + (0.5 * log_var).exp() * torch.randn_like(mu) if sae.training else mu
        else:
            kl = 0.5 * mu.clamp(-10, 10).pow(2).sum(-1).mean()
            z = mu + torch.randn_like(mu) if (sae.training and self.sample_fixed_variance) else mu
        _, idx = z.abs().topk(self.k, dim=-1, sorted=False)
        return Codes(vals=z.gather(-1, idx), idx=idx, kl=kl)


class BatchTopK(Activation):
    """`k`: latents per token on average; `threshold_beta`: EMA factor of the inference threshold, kept in
    the SAE's `threshold` buffer (negative until the first training batch)."""

    name = "batchtopk"
    uses_aux = True

    def __init__(self, k: int = 32, threshold_beta: float = 0.999):
        self.k, self.threshold_beta = int(k), threshold_beta

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        pre = sae.pre_acts(x_c)
        a = pre.clamp_min(0)
        if sae.training:
            flat = a.flatten()
            top, pos = flat.topk(min(self.k * a.shape[0], a.numel()), sorted=False)
            f = torch.zeros_like(flat).scatter(0, pos, top).view_as(a)
            with torch.no_grad():
                kept = top[top > 0]
                if kept.numel():
                    m, th, beta = kept.min(), sae.threshold, self.threshold_beta
                    sae.threshold.copy_(torch.where(th < 0, m, beta * th + (1 - beta) * m))
        else:
            f = a * (a > sae.threshold.clamp_min(0))
        return Codes(acts=f, aux=dead_topk(pre, dead, k_aux) if k_aux else None)


class JumpReLU(Activation):
    """`bandwidth`: ε of the straight-through rectangle kernel; `init_threshold`: θ at initialisation."""

    name = "jumprelu"

    def __init__(self, bandwidth: float = 0.001, init_threshold: float = 0.001):
        self.bandwidth, self.init_threshold = bandwidth, init_threshold

    def add_parameters(self, sae) -> None:
        sae.log_threshold = nn.Parameter(torch.full((sae.h,), math.log(self.init_threshold)))

    def encode(self, sae, x_c, grad, dead, k_aux) -> Codes:
        pre = sae.pre_acts(x_c)
        return Codes(
            acts=jumprelu(pre, sae.log_threshold, self.bandwidth),
            l0_ste=heaviside_step(pre, sae.log_threshold, self.bandwidth).sum(-1),
        )
