"""ARD-VAE relevant latent dimensions (Saha et al. 2025; card section 4, "Identifying relevant dimensions"):

1. encode up to `num_samples` training images, one posterior sample each: sigma_hat_l^2 = mean_i z_il^2;
2. decoder sensitivity on `jacobian_samples` images: J_i = d x_hat / d mu (D x L, forward-mode, one pass per
   axis), w_l = sum_d (mean_i |J_i,dl|)^2;
3. relevance rho_l = w_l sigma_hat_l^2, ranked; the active set is the shortest prefix of the ranking whose
   share of sum(rho) reaches `threshold` (0.99);
4. the pruned-decoder check on the evaluation split: reconstruct from mu with only the kept axes (the others set
   to their mean over the encoded training images) vs all axes vs none kept; squared error summed per image.

Metrics: active_dims, the ranking of the kept axes (rank_<k> = axis index), kept share, reconstruction errors.
The full ranking (rho, w, sigma_hat^2 and each axis's share) is written to <out_dir>/ard_relevance.json, and a
grid (inputs / all axes / kept axes / dropped axes only) to <out_dir>/ard_pruned_recon.png."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aeforge.callbacks.ard_prior import encoded_samples
from aeforge.eval.skips import skipped
from aeforge.models.ard_vae import hyper_prior_variance


def relevant_dimensions(rho: torch.Tensor, threshold: float = 0.99) -> tuple[torch.Tensor, int]:
    """(axes sorted by decreasing relevance, count of the smallest prefix with cumulative share >= threshold)."""
    order = torch.argsort(rho, descending=True, stable=True)
    total = rho.sum()
    if total <= 0:
        return order, 0
    share = rho[order].cumsum(0) / total
    # round-off: a share that is 0.99 exactly must count as reached
    count = int(torch.searchsorted(share, torch.tensor(threshold, dtype=share.dtype) - 1e-12)) + 1
    return order, min(count, len(rho))


def decoder_sensitivity(model, mu: torch.Tensor) -> torch.Tensor:
    """w_l = sum_d (mean_i |d x_hat_d / d mu_l|_i)^2 for the (n, L) means `mu`; decoder in eval mode."""
    from torch.func import jvp

    was_training = model.training
    model.eval()
    try:
        w = torch.empty(mu.shape[1])
        for axis in range(mu.shape[1]):
            tangent = torch.zeros_like(mu)
            tangent[:, axis] = 1.0
            _, col = jvp(model.decode, (mu,), (tangent,))  # (n, *x_shape): column `axis` of every J_i
            w[axis] = col.flatten(1).abs().mean(0).pow(2).sum().cpu()
    finally:
        model.train(was_training)
    return w


class ARDRelevance:
    def __init__(self, num_samples: int = 10000, jacobian_samples: int = 100, threshold: float = 0.99,
                 seed: int = 0, split: str = "val", out_dir: str | None = None, num_images: int = 8):
        if not 0 < threshold <= 1:
            raise ValueError(f"ARDRelevance.threshold must be in (0, 1], got {threshold}")
        self.num_samples, self.jacobian_samples, self.threshold = num_samples, jacobian_samples, threshold
        self.seed, self.split, self.out_dir, self.num_images = seed, split, out_dir, num_images

    def _train_batches(self, ctx):
        seen = 0
        for batch in ctx.batches("train", "ARD: encode"):
            if seen >= self.num_samples:
                break
            seen += len(batch["x"])
            yield batch

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model = ctx.model
        if not hasattr(model, "posterior") or not hasattr(model, "decode"):
            return skipped(type(self).__name__, f"{type(model).__name__} is not a Gaussian VAE (no posterior/decode)")
        gen = torch.Generator(device=ctx.device).manual_seed(self.seed)
        z, mu = encoded_samples(model, self._train_batches(ctx), gen)
        z, mu = z[: self.num_samples], mu[: self.num_samples]
        var = hyper_prior_variance(z)
        with torch.enable_grad():
            w = decoder_sensitivity(model, mu[: self.jacobian_samples].to(ctx.device))
        rho = w * var.cpu()
        order, count = relevant_dimensions(rho, self.threshold)
        kept = torch.zeros(len(rho), dtype=torch.bool)
        kept[order[:count]] = True
        share = rho / rho.sum() if rho.sum() > 0 else torch.zeros_like(rho)
        errors, grid = self._pruned_reconstruction(ctx, mu.mean(0).to(ctx.device), kept.to(ctx.device))
        out = {"active_dims": float(count), "latent_dims": float(len(rho)),
               "kept_share": float(share[kept].sum()), **errors}
        out.update({f"rank_{k + 1:02d}": float(a) for k, a in enumerate(order[:count].tolist())})
        if self.out_dir is not None:
            self._write(Path(self.out_dir), order, count, rho, share, w, var, model, grid, ctx)
        return out

    def _pruned_reconstruction(self, ctx, mean_mu: torch.Tensor, kept: torch.Tensor):
        model, sums, n, grid = ctx.model, {"all": 0.0, "kept": 0.0, "dropped": 0.0, "none": 0.0}, 0, None
        for batch in ctx.batches(self.split, "ARD: pruned reconstruction"):
            x = batch["x"].float()
            mu, _ = model.posterior(x)
            variants = {"all": mu, "kept": torch.where(kept, mu, mean_mu), "dropped": torch.where(kept, mean_mu, mu),
                        "none": mean_mu.expand_as(mu)}
            recons = {k: model.decode(v).float() for k, v in variants.items()}
            for k, r in recons.items():
                sums[k] += float((r - x).pow(2).flatten(1).sum(1).sum())
            if grid is None and x.ndim == 4:
                m = self.num_images
                grid = torch.cat([x[:m], recons["all"][:m], recons["kept"][:m], recons["dropped"][:m]]).cpu()
            n += len(x)
        return {f"recon_sse_{k}": v / max(n, 1) for k, v in sums.items()}, grid

    def _write(self, out: Path, order, count, rho, share, w, var, model, grid, ctx) -> None:
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "threshold": self.threshold, "active_dims": count, "ranking": order.tolist(),
            "kept": order[:count].tolist(), "rho": rho.tolist(), "share": share.tolist(),
            "decoder_sensitivity": w.tolist(), "sigma_hat2": var.tolist(),
            "model_prior_var": model.prior_var.tolist() if hasattr(model, "prior_var") else None,
        }
        (out / "ard_relevance.json").write_text(json.dumps(report, indent=2))
        if grid is not None:
            from torchvision.utils import save_image

            dm = ctx.datamodule
            grid = dm.denormalize(grid) if hasattr(dm, "denormalize") else grid
            save_image(grid, out / "ard_pruned_recon.png", nrow=len(grid) // 4, padding=2, pad_value=1.0)
