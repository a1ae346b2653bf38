"""MAR's diffusion loss beyond the ε-MSE (which is objectives/flow.py's `EpsilonLoss` weighted by the model's
`loss_weight`, the masked-token mean): the improved-DDPM variational bound that trains the learned variance
("learn sigma", Nichol & Dhariwal 2021), with a stop-gradient on the predicted mean, so ε is trained by the MSE
alone and the variance by this term. Card 9 of /work/shared/methods/mae_family.md, §9.4."""

from __future__ import annotations

import math

import torch

from aeforge.nn.diffusion import NoiseSchedule
from aeforge.objectives import LossTerm, Metric


def gaussian_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


class LearnedVarianceVLB(LossTerm):
    """Per token: KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) for t > 0 and −log p_θ(x_0 | x_1) for t = 0, in
    bits per dimension; p_θ's mean from the detached ε-prediction, its log-variance interpolated between log β_t
    and log β̃_t by the model's `var_values` in [-1, 1]. Averaged with `outputs[key_weight]` (the masked-token
    mean). At t = 0 this uses a continuous Gaussian likelihood (tokens are continuous), not the discretised
    8-bit one of the image-space original. `schedule`/`timesteps` must be the model's (the config interpolates
    them)."""

    def __init__(self, weight: float = 1.0, schedule: str = "cosine", timesteps: int = 1000,
                 key_weight: str | None = "loss_weight"):
        super().__init__(weight)
        self.schedule = NoiseSchedule(kind=schedule, steps=timesteps)
        self.key_weight = key_weight

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        if "var_values" not in outputs:
            raise KeyError("var_values: the model predicts no variance (model.learn_sigma=false); drop this "
                           "term with ~objective.terms.vlb")
        s = self.schedule
        x0, x_t, t = outputs["x0"].double(), outputs["x_t"].double(), outputs["t"].long()
        eps = outputs["eps_pred"].detach().double()  # stop-gradient on the mean: ε is the MSE term's
        betas, ac = s.betas.to(x0.device), s.alphas_cumprod.to(x0.device)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped: β̃_0 = 0
        col = lambda v: v[t].unsqueeze(-1)
        coef_x0 = col(betas * ac_prev.sqrt() / (1 - ac))
        coef_xt = col((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))
        true_mean = coef_x0 * x0 + coef_xt * x_t
        x0_hat = (x_t - col((1 - ac).sqrt()) * eps) / col(ac.sqrt())
        model_mean = coef_x0 * x0_hat + coef_xt * x_t
        frac = (outputs["var_values"].double() + 1) / 2
        model_logvar = frac * col(torch.log(betas)) + (1 - frac) * col(post_logvar)
        kl = gaussian_kl(true_mean, col(post_logvar), model_mean, model_logvar).mean(-1)
        nll = 0.5 * (math.log(2 * math.pi) + model_logvar + (x0 - model_mean).pow(2) * torch.exp(-model_logvar))
        vlb = torch.where(t == 0, nll.mean(-1), kl) / math.log(2.0)
        if self.key_weight is not None:
            vlb = vlb * outputs[self.key_weight].double()
        return vlb.mean().float()


class MaskRatio(Metric):
    """The batch's sampled mask ratio (logged: it should spread over [mask_ratio_min, 1])."""

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        return outputs["mask_ratio"].float()
