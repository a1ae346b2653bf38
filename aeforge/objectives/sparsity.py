"""SAE losses (card §2-7). One objective class, each coefficient switches a term on, so sweeps and the
issue's commands (`objective.afa_coef=0.03125`) address them directly. Every term sums over the sites
of an `SAEBank` (independent SAEs, so the sum optimises each one separately).

- recon: `mse` per-element mean (Bussmann / top-AFA code), `sum` per-token sum, batch mean (Kissane,
  dictionary_learning, vSAE, Anthropic), `nmse` Σ‖x − x̂‖² / Σ‖x − x̄‖² of the batch (Gao et al.)
- aux (AuxK, coef 1/32 in every reference): `plain` MSE(ê, e) with e = x − x̂ not detached (Bussmann,
  top-AFA); `gao` MSE(ê, e)/MSE(ē, e) with e detached (OpenAI; vSAE uses the same normalisation)
- l1: λ · mean_batch Σ_i f_i‖d_i‖ (plain L1 when decoder rows are unit norm)
- l0: λ · mean_batch Σ_i H(π_i − θ_i) with straight-through gradients (JumpReLU)
- afa: λ_AFA · mean_batch (‖f̃‖ − ‖x‖)² with ‖x‖ of the un-centred input (`afa_target: x`, the official
  code) or of x − b_dec (`x_c`, consistent with the selection rule)
- kl: c_KL · s(t) · KL (vSAE), s(t) a linear warm-up over the first `kl_warmup` fraction of training, t the
  run's progress `batch["progress"].fraction` (no progress, as in evaluators: training is done, s = 1)

Besides the loss and its terms the objective returns three logged values that are never summed: `l0`
(active latents per token), `fvu` (Σ‖x − x̂‖² / Σ‖x − x̄‖² of the batch) and `dead_frac` (the training
counter's dead latents), each the mean over sites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from aeforge.models.sae import SiteOutput


def recon_loss(x: torch.Tensor, recon: torch.Tensor, mode: str) -> torch.Tensor:
    err = (recon - x).pow(2)
    if mode == "mse":
        return err.mean()
    if mode == "sum":
        return err.sum(-1).mean()
    if mode == "nmse":
        return err.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    raise ValueError(f"objective.recon={mode!r}; valid: ['mse', 'nmse', 'sum']")


class SAEObjective(nn.Module):
    def __init__(
        self,
        recon: str = "mse",
        aux_coef: float = 0.03125,
        aux_mode: str = "plain",
        l1_coef: float = 0.0,
        l0_coef: float = 0.0,
        afa_coef: float = 0.0,
        afa_target: str = "x",
        kl_coef: float = 0.0,
        kl_warmup: float = 0.1,
    ):
        super().__init__()
        if aux_mode not in ("plain", "gao"):
            raise ValueError(f"objective.aux_mode={aux_mode!r}; valid: ['gao', 'plain']")
        if afa_target not in ("x", "x_c"):
            raise ValueError(f"objective.afa_target={afa_target!r}; valid: ['x', 'x_c']")
        recon_loss(torch.zeros(2, 1), torch.zeros(2, 1), recon)  # validates the mode
        self.recon, self.aux_coef, self.aux_mode = recon, aux_coef, aux_mode
        self.l1_coef, self.l0_coef, self.afa_coef, self.afa_target = l1_coef, l0_coef, afa_coef, afa_target
        self.kl_coef, self.kl_warmup = kl_coef, kl_warmup

    def aux_loss(self, o: SiteOutput) -> torch.Tensor:
        if o.aux_recon is None:
            return o.recon.new_zeros(())
        e = o.x - o.recon
        if self.aux_mode == "gao":
            e = e.detach()
            num = (o.aux_recon - e).pow(2).mean()
            den = (e - e.mean(0)).pow(2).mean().clamp_min(1e-12)
            return torch.nan_to_num(num / den)
        return (o.aux_recon - e).pow(2).mean()

    def afa_loss(self, o: SiteOutput) -> torch.Tensor:
        if o.f_norm is None:
            raise ValueError("objective.afa_coef > 0 needs model.activation to be TopAFA")
        target = o.x.norm(dim=-1) if self.afa_target == "x" else o.xc_norm
        return (o.f_norm - target).pow(2).mean()

    def kl_ramp(self, batch: dict) -> float:
        progress = batch.get("progress")
        p = progress.fraction if progress is not None else 1.0
        return min(p / self.kl_warmup, 1.0) if self.kl_warmup > 0 else 1.0

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        sites: list[SiteOutput] = outputs["sites"]
        terms: dict[str, torch.Tensor] = {"recon": sum(recon_loss(o.x, o.recon, self.recon) for o in sites)}
        loss = terms["recon"]
        if self.aux_coef:
            terms["aux"] = sum(self.aux_loss(o) for o in sites)
            loss = loss + self.aux_coef * terms["aux"]
        if self.l1_coef:
            terms["l1"] = sum(o.l1.mean() for o in sites)
            loss = loss + self.l1_coef * terms["l1"]
        if self.l0_coef:
            terms["l0_ste"] = sum(o.l0_ste.mean() for o in sites if o.l0_ste is not None)
            loss = loss + self.l0_coef * terms["l0_ste"]
        if self.afa_coef:
            terms["afa"] = sum(self.afa_loss(o) for o in sites)
            loss = loss + self.afa_coef * terms["afa"]
        if self.kl_coef:
            terms["kl"] = sum(o.kl for o in sites if o.kl is not None)
            loss = loss + self.kl_coef * self.kl_ramp(batch) * terms["kl"]
        with torch.no_grad():
            n = len(sites)
            logged = {
                "l0": sum(o.l0.mean() for o in sites) / n,
                "fvu": sum(recon_loss(o.x, o.recon, "nmse") for o in sites) / n,
                "dead_frac": sum(o.dead_frac for o in sites) / n,
            }
        return {"loss": loss, **terms, **logged}
