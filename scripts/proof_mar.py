"""CPU proof for MAR (card 9) on MNIST, pixels as tokens: (b) class-conditional samples are recognised by a CNN
classifier trained on real MNIST (accuracy vs the 10 % of chance), and (c) a linear probe of the encoder
(mask 0, buffers dropped, mean-pooled) beats the same probe on a random-init encoder.

The model is conf/model/mar.py's code at a width the shared 2-core CPU trains in minutes (SMALL below: 7x7
patches -> 16 tokens of 49 values, 128-d x 2 + 2 blocks, DiffLoss MLP 2 x 128, diffusion_batch_mul 2), trained
with the mar_mnist recipe's loss (ε-MSE + learned-variance VLB), optimiser and EMA for `--steps` steps.
    .venv/bin/python scripts/proof_mar.py [--steps 1500] [--seed 0]
Prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proof_common import compose  # noqa: E402

SMALL = ["experiment=mar_mnist", "model.patch_size=7", "model.embed_dim=128", "model.depth=2", "model.num_heads=4",
         "model.decoder_embed_dim=128", "model.decoder_depth=2", "model.decoder_num_heads=4", "model.buffer_size=4",
         "model.diffloss_depth=2", "model.diffloss_width=128", "model.diffusion_batch_mul=2",
         "model.sample_diffusion_steps=50", "data.batch_size=64"]


def probe_acc(feats_tr, y_tr, feats_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(feats_tr)
    clf = LogisticRegression(max_iter=500).fit(sc.transform(feats_tr), y_tr)
    return float(clf.score(sc.transform(feats_te), y_te))


def main(argv=None) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from PIL import Image

    from aeforge.eval.conditional import condition_classifier
    from aeforge.objectives.mar import LearnedVarianceVLB  # noqa: F401  (built through the config)
    from aeforge.train import model_inputs

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples_per_class", type=int, default=10)
    args = p.parse_args(argv)
    cfg = compose([*SMALL, f"seed={args.seed}"])
    torch.manual_seed(args.seed)
    data = np.load(cfg.data.path)
    to_x = lambda a: torch.from_numpy(a).float().div(127.5).sub(1).unsqueeze(1)  # [-1, 1], the recipe's range
    x_tr, y_tr = to_x(data["x"]), torch.from_numpy(data["y"]).long()
    x_te, y_te = to_x(data["x_test"]), torch.from_numpy(data["y_test"]).long()

    class DM:  # what model_inputs reads
        input_shape, num_classes = (1, 28, 28), 10

    model = instantiate(cfg.model, **model_inputs(cfg.model, DM()))
    random_model = instantiate(cfg.model, **model_inputs(cfg.model, DM()))  # same init recipe, another draw
    objective = instantiate(cfg.objective)
    skip = model.no_weight_decay()
    named = list(model.named_parameters())
    groups = [{"params": [q for n, q in named if q.ndim > 1 and n not in skip], "weight_decay": cfg.optim.weight_decay},
              {"params": [q for n, q in named if q.ndim <= 1 or n in skip], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    ema = {n: q.detach().clone() for n, q in named}
    decay, warm = cfg.callbacks.ema.decay, max(1, args.steps // 10)
    g = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.time()
    model.train()
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = cfg.optim.lr * min(1.0, (step + 1) / warm)  # warmup, then constant (card)
        idx = torch.randint(0, len(x_tr), (cfg.data.batch_size,), generator=g)
        batch = {"x": x_tr[idx], "y": y_tr[idx]}
        out = objective(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        with torch.no_grad():  # EMA with warmup: a plain 0.999 keeps 0.999^steps (30 % at 1200) of the init
            d = min(decay, (1 + step) / (10 + step))
            for n, q in named:
                ema[n].lerp_(q.detach(), 1 - d)
        losses.append((float(out["diffusion"].detach()), float(out["vlb"].detach())))
    train_s = time.time() - t0
    with torch.no_grad():
        for n, q in named:
            q.copy_(ema[n])
    model.eval()

    # the judge: a CNN trained on real MNIST (aeforge/eval/conditional.py's classifier), 2 epochs
    torch.manual_seed(args.seed)
    clf = condition_classifier((1, 28, 28), 10, [32, 64, 128])
    copt = torch.optim.Adam(clf.parameters(), 1e-3)
    for _ in range(2):
        for ids in torch.randperm(len(x_tr), generator=g).split(128):
            loss = F.cross_entropy(clf(x_tr[ids]), y_tr[ids])
            copt.zero_grad()
            loss.backward()
            copt.step()
    clf.eval()
    with torch.no_grad():
        real_acc = float((clf(x_te[:2000]).argmax(1) == y_te[:2000]).float().mean())
        labels = torch.arange(10).repeat_interleave(args.samples_per_class)
        results = {}
        for guidance in (1.0, 3.0):
            t1 = time.time()
            imgs = model.sample(len(labels), labels, guidance=guidance, steps=16,
                                generator=torch.Generator().manual_seed(args.seed))
            acc = float((clf(imgs).argmax(1) == labels).float().mean())
            results[f"cfg{guidance:g}"] = {"sample_acc": acc, "seconds": time.time() - t1}
            np.save(f"/tmp/mar_samples_cfg{guidance:g}.npy", imgs.numpy())
            grid = imgs[:, 0].reshape(10, -1, 28, 28).permute(0, 2, 1, 3).reshape(280, -1)  # row = class
            Image.fromarray(((grid + 1) * 127.5).clamp(0, 255).byte().numpy()).save(
                f"/tmp/mar_samples_cfg{guidance:g}.png")
        n_tr, n_te = 5000, 2000
        feats = lambda m, x: torch.cat([m.encode({"x": c}) for c in x.split(500)]).numpy()
        probe = {"trained": probe_acc(feats(model, x_tr[:n_tr]), y_tr[:n_tr].numpy(), feats(model, x_te[:n_te]),
                                      y_te[:n_te].numpy()),
                 "random_init": probe_acc(feats(random_model.eval(), x_tr[:n_tr]), y_tr[:n_tr].numpy(),
                                          feats(random_model, x_te[:n_te]), y_te[:n_te].numpy())}
    first, last = np.mean(losses[:50], 0), np.mean(losses[-50:], 0)
    report = {"seed": args.seed, "steps": args.steps, "train_seconds": round(train_s, 1),
              "eps_mse_first50": float(first[0]), "eps_mse_last50": float(last[0]),
              "vlb_first50": float(first[1]), "vlb_last50": float(last[1]),
              "classifier_real_acc": real_acc, "chance": 0.1, "samples": results,
              "linear_probe_mask0": probe, "overrides": SMALL}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
