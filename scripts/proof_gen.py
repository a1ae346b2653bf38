"""Proof of the shared generative blocks (docs/generative.md); prints JSON.

1. DDIM inversion (nn/diffusion.py): encode → decode at η = 0 on Gaussian data N(0.3, 0.8²) with the analytic
   optimal ε, relative RMSE vs steps, plain (LDAE's) and with fixed-point refinement; seeds 0-2.
2. Flow samplers (nn/flow.py): Euler vs Heun from noise with the exact velocity of Gaussian data, error against
   the exact transport map x = μ + σ·z, vs steps and shift — the orders of convergence (1 and 2).
3. The `generation` evaluator's proxy metrics on real MNIST (the packaged 10k subset): a proxy classifier trained
   on the train split scores held-out real digits, blurred digits, pixel-shuffled digits and uniform noise as
   "samples" (labels = the true ones); proxy FID / IS / precision / recall / class accuracy must order them.
   Seeds 0-2 (the classifier's); 1000 held-out digits as samples (500 with --quick), 5000 training digits.

    .venv/bin/python scripts/proof_gen.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from aeforge.nn import flow
from aeforge.nn.diffusion import NoiseSchedule


def ddim_inversion(seeds) -> dict:
    mu, sig = 0.3, 0.8
    sched = NoiseSchedule("linear", 1000)

    def eps_fn(x, t):
        a = sched.alpha_bar(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sig**2 + 1 - a)

    out = {}
    for steps in (10, 20, 50, 100):
        for iters in (0, 3):
            errs = []
            for seed in seeds:
                x0 = mu + sig * torch.randn(4096, generator=torch.Generator().manual_seed(seed))
                back = sched.ddim_sample(eps_fn, sched.ddim_encode(eps_fn, x0, steps, iters), steps)
                errs.append(((back - x0).pow(2).mean().sqrt() / sig).item())
            out[f"steps{steps}_fp{iters}"] = {"rel_rmse_mean": sum(errs) / len(errs), "per_seed": errs}
    return out


def flow_samplers() -> dict:
    mu, sig = 1.5, 0.5

    def velocity(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * sig**2 + t**2
        resid = x - (1 - t) * mu
        return t / var * resid - (mu + (1 - t) * sig**2 / var * resid)

    z = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + sig * z
    out = {}
    for shift in (1.0, 3.0):
        for name, sampler in (("euler", flow.euler_sample), ("heun", flow.heun_sample)):
            for steps in (5, 10, 20, 40):
                err = (sampler(velocity, z, steps, shift) - exact).abs().max().item()
                out[f"{name}_shift{shift:g}_steps{steps}"] = err
    return out


class FixedSamples(torch.nn.Module):
    """A stand-in 'generator' that returns given images ([-1, 1]) in order, with their labels."""

    def __init__(self, images01: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.images, self.labels, self.pos, self.num_classes = images01 * 2 - 1, labels, 0, 10

    def sample(self, n, labels, guidance, steps, generator):
        out = self.images[self.pos:self.pos + n]
        self.pos += n
        return out


def proxy_calibration(seeds, n: int) -> dict:
    from aeforge.compose import compose_config
    from aeforge.eval import EvalContext
    from aeforge.eval.generation import GenerationMetrics
    from aeforge.train import build

    cfg = compose_config(["data=mnist_subset"])
    dm = build(cfg.data, seed=0)
    dm.setup("fit")
    xs, ys = [], []
    for b in dm.eval_dataloader("val", 500):
        xs.append(b["x"].float() / 255)
        ys.append(b["y"])
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    # n held-out digits in the label order the evaluator asks for (i % 10)
    order = torch.cat([torch.nonzero(y_all == (i % 10))[i // 10] for i in range(n)])
    x_val, y_val = x_all[order], y_all[order]
    blur = F.avg_pool2d(F.pad(x_val, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    g = torch.Generator().manual_seed(0)
    shuffled = x_val.flatten(1)[:, torch.randperm(28 * 28, generator=g)].view_as(x_val)
    noise = torch.rand(x_val.shape, generator=g)
    sets = {"real_heldout": x_val, "blurred_5x5": blur, "pixel_shuffled": shuffled, "uniform_noise": noise}
    out = {}
    for seed in seeds:
        ev = GenerationMetrics(num_samples=n, steps=1, proxy_epochs=3, seed=seed, cache_dir=None, grid=0)
        # the classifier sees the first 5000 training digits (eval.max_samples), 3 epochs
        ctx = EvalContext(None, dm, torch.device("cpu"), batch_size=500, max_samples=5000)
        clf = ev.proxy_classifier(ctx)  # trained once per seed, reused for every set
        ev.proxy_classifier = lambda ctx, clf=clf: clf
        for name, images in sets.items():
            ctx.model = FixedSamples(images, y_val)
            m = ev(ctx)
            row = out.setdefault(name, {})
            for k in ("fid_proxy", "is_proxy", "precision_proxy", "recall_proxy", "class_acc_proxy", "real_acc_proxy"):
                row.setdefault(k, []).append(round(m[k], 4))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 500 samples")
    args = ap.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    t0 = time.time()
    result = {"ddim_inversion": ddim_inversion(seeds), "flow_samplers": flow_samplers(),
              "proxy_calibration_mnist": proxy_calibration(seeds, 500 if args.quick else 1000),
              "seeds": seeds, "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
