"""CPU proof of FAE (card 6) on the staged CIFAR-10 subset (4,500 train / 500 held-out images, 32 px).

1. A frozen encoder: an aeforge MAE (conf/model/mae.yaml, ViT 192 x 6, patch 4 -> 8x8 tokens x 192) trained on
   the train split (`model=mae data=cifar10_subset seed=0`), or an existing run's checkpoint (--mae-ckpt, e.g.
   the one scripts/proof_rae.py trains with the same command).
2. FAE stage Ia (`experiment=fae_cifar10`: FAE encoder -> 8-channel Gaussian tokens -> 2-layer RoPE/RMSNorm/
   SwiGLU feature decoder, the recipe's objective: L2 + 1e-4 KL) with the paper's single attention layer and with
   its linear-encoder ablation, seeds 0 and 1, the same recipe otherwise. The model and objective are the
   recipe's, but training is a plain loop over frozen features computed once (the encoder is frozen, so they
   are the same every epoch; on this shared 2-core machine re-encoding each batch made 4 runs take ~20 min):
   AdamW at the recipe's lr / betas / weight decay, constant lr, batch 128, no hflip augmentation.
3. Held-out scores: weighted cosine k-NN accuracy (aeforge/eval/probes.py KNN, k = 20, T = 0.07; train split as
   the bank) of the FAE latent μ vs the raw frozen features, both mean-pooled over tokens and flattened; the
   feature reconstruction error (MSE, per-token cosine) and k-NN on the reconstructed features.

    python scripts/proof_fae.py [--out /tmp/fae_proof] [--mae-ckpt <run>/checkpoints/last.ckpt] [--epochs 1]

Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("AEFORGE_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def train_mae(out: Path, epochs: int) -> Path:
    """An aeforge MAE run through train.py's `run` (it writes the checkpoint and config FrozenEncoder reads)."""
    from omegaconf import open_dict

    from aeforge.compose import compose_config
    from aeforge.train import run

    cfg = compose_config(["model=mae", "data=cifar10_subset", f"trainer.max_epochs={epochs}", "seed=0",
                          "evaluate=false"], output_dir=out, task_name=out.name)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    run(cfg)
    return out / "checkpoints" / "last.ckpt"


def split_arrays(dm, split: str):
    import torch

    xs, ys = [], []
    for batch in dm.eval_dataloader(split, 250):
        xs.append(dm.normalize(batch["x"]))
        ys.append(batch["y"])
    return torch.cat(xs), torch.cat(ys)


def knn(train: tuple, val: tuple) -> float:
    from aeforge.eval.probes import KNN

    ctx = SimpleNamespace(has_labels=True, features=lambda split: train if split == "train" else val)
    return round(KNN(k=20, temperature=0.07)(ctx)["acc"], 4)


def batched(fn, x, size: int = 250):
    import torch

    with torch.no_grad():
        return torch.cat([fn(c) for c in x.split(size)])


def train_feature_vae(model, objective, cfg, feats, epochs: int, seed: int):
    """Stage Ia on cached frozen features: the model's own pieces (posterior -> reparameterised z -> feature
    decoder, as FAE.forward does in training) and the recipe's objective; returns (seconds, first/last loss)."""
    import torch

    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    g = torch.Generator().manual_seed(seed)
    batch_size, losses, t0 = cfg.data.batch_size, [], time.time()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(feats), generator=g).split(batch_size):
            f = feats[idx]
            mu, logvar = model.posterior(f)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            out = {"feat": f, "feat_pred": model.feature_decoder(z), "mu": mu, "logvar": logvar, "z": z}
            loss = objective(out, {"x": f})["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return time.time() - t0, [round(losses[0], 4), round(sum(losses[-10:]) / 10, 4)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/fae_proof")
    p.add_argument("--mae-ckpt", default=None, help="an aeforge MAE run's last.ckpt (else one is trained)")
    p.add_argument("--mae-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from proof_common import build_parts, compose

    # one thread: on the shared 2-core machine two contending threads ran far slower per step (proof_common.py)
    torch.set_num_threads(1)
    t_start = time.time()
    out = Path(args.out)
    mae_ckpt = Path(args.mae_ckpt) if args.mae_ckpt else train_mae(out / "mae", args.mae_epochs)
    result: dict = {"frozen_encoder": f"aeforge:{mae_ckpt}", "mae_trained_here": args.mae_ckpt is None,
                    "fae_epochs": args.epochs, "seeds": args.seeds, "knn": "weighted cosine, k=20, T=0.07"}

    runs, x_tr, dm = {}, None, None
    for kind in ("attention", "linear"):
        for seed in args.seeds:
            cfg = compose(["experiment=fae_cifar10", f"model.encoder_source=aeforge:{mae_ckpt}",
                           f"model.encoder_type={kind}", f"seed={seed}", f"trainer.max_epochs={args.epochs}"])
            dm, model, module = build_parts(cfg, dm)
            if x_tr is None:  # the frozen features: the same encoder in every run
                dm.setup("fit")
                (x_tr, y_tr), (x_va, y_va) = split_arrays(dm, "train"), split_arrays(dm, "val")
                f_tr, f_va = batched(model.features, x_tr), batched(model.features, x_va)
                result["raw_features"] = {
                    "shape": list(f_tr.shape[1:]),
                    "knn_mean_pooled": knn((f_tr.mean(1), y_tr), (f_va.mean(1), y_va)),
                    "knn_flattened": knn((f_tr.flatten(1), y_tr), (f_va.flatten(1), y_va))}
                print(f"[proof_fae] features {tuple(f_tr.shape)}: {time.time() - t_start:.0f} s", file=sys.stderr)
            secs, curve = train_feature_vae(model, module.objective, cfg, f_tr, args.epochs, seed)
            model.eval()
            with torch.no_grad():
                mu_tr = batched(lambda f, m=model: m.posterior(f)[0], f_tr)
                mu_va = batched(lambda f, m=model: m.posterior(f)[0], f_va)
                rec_va = batched(model.feature_decoder, mu_va)
                rec_tr = batched(model.feature_decoder, mu_tr)
            runs[f"{kind}/seed{seed}"] = {
                "train_seconds": round(secs),
                "train_loss_first_last": curve,
                "params_encoder": sum(q.numel() for q in model.encoder.parameters()),
                "latent_shape": list(mu_va.shape[1:]),
                "knn_latent_mean_pooled": knn((mu_tr.mean(1), y_tr), (mu_va.mean(1), y_va)),
                "knn_latent_flattened": knn((mu_tr.flatten(1), y_tr), (mu_va.flatten(1), y_va)),
                "knn_recon_features_mean_pooled": knn((rec_tr.mean(1), y_tr), (rec_va.mean(1), y_va)),
                "val_feature_mse": round((rec_va - f_va).pow(2).mean().item(), 4),
                "val_feature_var": round(f_va.var(dim=(0, 1)).mean().item(), 4),
                "val_token_cosine": round(F.cosine_similarity(rec_va, f_va, dim=-1).mean().item(), 4)}
            print(f"[proof_fae] {kind} seed {seed}: {runs[f'{kind}/seed{seed}']}", file=sys.stderr)
    result["runs"] = runs
    result["seconds"] = round(time.time() - t_start)
    result["threads"] = torch.get_num_threads()
    result["load_average"] = [round(v, 1) for v in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
