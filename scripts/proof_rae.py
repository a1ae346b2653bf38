"""CPU proof of RAE (card 2) on the staged CIFAR-10 subset (4,500 train / 500 held-out images, 32 px).

1. A frozen encoder: an aeforge MAE (conf/model/mae.yaml, ViT 192 x 6, patch 4 -> 8x8 tokens x 192) trained on
   the train split (`model=mae data=cifar10_subset`; 1 epoch = 36 steps by default: the CPU budget).
   The runs are CPU-budget short (RAE 80 steps, DiT 100 steps): they show the mechanisms, not converged models.
2. RAE decoders (`experiment=rae_cifar10`) with latent noise tau = 0.8 and tau = 0, same seed and recipe:
   held-out PSNR / SSIM on clean latents, and on latents + N(0, sigma^2) noise (sigma 0.25, 0.5; noise seeds
   0, 1, 2) — the card's robustness check: the tau = 0.8 decoder should lose less.
3. Two small DiT^DH generators (`experiment=rae_dit_cifar10`) in the tau = 0.8 RAE's latent, with and without
   the dimension shift (s = sqrt(8*8*192/4096) = 1.73), same recipe and seed: training-loss curves, held-out
   velocity loss at fixed t (same noise for both), and class-conditional samples (20 per class) scored by a
   small CNN trained here on the real train split (its held-out accuracy is reported too; chance = 10 %).

    python scripts/proof_rae.py [--out /tmp/rae_proof] [--mae-epochs 1 | --mae-ckpt <run>/checkpoints/last.ckpt]
        [--rae-steps 80] [--dit-steps 100] [--per-class 20] [--reuse]

Prints one JSON object. Runs go through train.py's `run` (checkpoints, metrics.csv) under --out."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AEFORGE_DATA_DIR", str(ROOT.parent / "shared" / "data"))


REUSE = False


def train(overrides: list[str], out: Path) -> Path:
    from omegaconf import open_dict

    if REUSE and (out / "metrics.json").is_file():  # --reuse: a finished run of an earlier invocation
        print(f"[proof_rae] {out.name}: reused", file=sys.stderr)
        return out

    from aeforge.compose import compose_config
    from aeforge.train import run

    cfg = compose_config([*overrides, "evaluate=false", "trainer.log_every_n_steps=10"], output_dir=out,
                         task_name=out.name)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    t0 = time.time()
    run(cfg)
    print(f"[proof_rae] {out.name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def load(run_dir: Path, ema: bool = False):
    """The run's model with its last weights (or its EMA weights)."""
    import torch
    from hydra.utils import instantiate

    from aeforge.targets.encoders import run_config
    from aeforge.train import model_inputs

    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    cfg = run_config(ckpt_path, "proof")
    dm = instantiate(cfg.data, seed=0)
    dm.setup("fit")
    model = instantiate(cfg.model, **model_inputs(cfg.model, dm))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    if ema:
        shadow = next((s["shadow"] for k, s in ckpt.get("callbacks", {}).items() if "EMA" in k), None)
        model.load_state_dict(shadow, strict=False)
    return model.eval(), dm


def held_out(dm):
    import torch

    xs, ys = [], []
    for batch in dm.eval_dataloader("val", 250):
        xs.append(dm.normalize(batch["x"]))
        ys.append(batch["y"])
    return torch.cat(xs), torch.cat(ys)


def recon_scores(model, x, sigma: float, seed: int) -> dict:
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = model.encoder(x)
        z = z + sigma * torch.randn(z.shape, generator=g)
        recon = model.decoder(z).clamp(-1, 1)
    a, b = (recon + 1) / 2, (x + 1) / 2
    return {"psnr": peak_signal_noise_ratio(a, b, data_range=1.0).item(),
            "ssim": structural_similarity_index_measure(a, b, data_range=1.0).item(),
            "l1": (recon - x).abs().mean().item()}


def loss_curve(run_dir: Path, every: int = 5) -> list[list[float]]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    pts = [[int(r["step"]), float(r["train/loss"])] for r in rows if r.get("train/loss")]
    return [[s, round(v, 4)] for s, v in pts[::every]]


def velocity_loss_at(model, x, y, ts=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0) -> dict:
    import torch

    from aeforge.nn.flow import interpolate

    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        z = model.rae.latents(x)
        noise = torch.randn(z.shape, generator=g)
        for t in ts:
            tt = torch.full((len(x),), t)
            v = model.dit(interpolate(z, noise, tt), tt, y)
            out[f"t={t}"] = round((v - (noise - z)).pow(2).mean().item(), 4)
    return out


class SmallCNN:
    """A real-data classifier for scoring samples: 3 conv blocks + linear, trained here (Adam, 8 epochs)."""

    @staticmethod
    def build():
        from torch import nn

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

        return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Dropout(0.3),
                             nn.Linear(128 * 16, 10))


def train_classifier(dm, x_val, y_val, epochs: int = 8):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    xs, ys = [], []
    for batch in dm.eval_dataloader("train", 500):
        xs.append(dm.normalize(batch["x"]))
        ys.append(batch["y"])
    x, y = torch.cat(xs), torch.cat(ys)
    net = SmallCNN.build()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x_val).argmax(1) == y_val).float().mean().item()
    return net, acc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/rae_proof")
    p.add_argument("--mae-epochs", type=int, default=1)
    p.add_argument("--mae-ckpt", default=None, help="reuse this MAE run's checkpoint instead of training one")
    p.add_argument("--rae-steps", type=int, default=80)
    p.add_argument("--dit-steps", type=int, default=100)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=20)
    # one thread: on the shared 2-core machine two contending threads ran far slower per step (proof_common.py)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="keep finished runs under --out instead of retraining")
    args = p.parse_args()
    global REUSE
    REUSE = args.reuse
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.time()
    result: dict = {"seeds": {"training": 0, "latent_noise": [0, 1, 2], "sampling": 0}}

    if args.mae_ckpt:
        mae_ckpt = Path(args.mae_ckpt)
    else:
        mae = train(["model=mae", "data=cifar10_subset", f"trainer.max_epochs={args.mae_epochs}", "seed=0"],
                    out / "mae")
        mae_ckpt = mae / "checkpoints" / "last.ckpt"
    import torch as _t

    result["mae_steps"] = int(_t.load(mae_ckpt, map_location="cpu", weights_only=False)["global_step"])

    raes = {}
    for tau in (0.8, 0.0):
        # the recipe's GAN starts (D at 1/2, G at 2/3 of the run) by step in this short run
        n = args.rae_steps
        raes[tau] = train(["experiment=rae_cifar10", f"rae.encoder_ckpt={mae_ckpt}", f"model.noise_tau={tau}",
                           f"trainer.max_steps={n}", "trainer.max_epochs=-1", "seed=0", "optim.warmup_steps=10",
                           "objective.terms.adversarial.disc_start_epoch=0",
                           "objective.terms.adversarial.start_epoch=0",
                           f"objective.terms.adversarial.disc_start_step={n // 2}",
                           f"objective.terms.adversarial.start_step={2 * n // 3}"], out / f"rae_tau{tau}")
    result["reconstruction"] = {}
    x_val = y_val = dm = None
    for tau, run_dir in raes.items():
        model, dm = load(run_dir)
        if x_val is None:
            x_val, y_val = held_out(dm)
        row = {"clean": recon_scores(model, x_val, 0.0, 0)}
        for sigma in (0.25, 0.5):
            per_seed = [recon_scores(model, x_val, sigma, s) for s in (0, 1, 2)]
            row[f"sigma={sigma}"] = {k: [round(r[k], 4) for r in per_seed] for k in per_seed[0]}
        row["clean"] = {k: round(v, 4) for k, v in row["clean"].items()}
        result["reconstruction"][f"tau={tau}"] = row

    classifier, real_acc = train_classifier(dm, x_val, y_val)
    result["classifier"] = {"held_out_accuracy_real": round(real_acc, 4), "chance": 0.1}
    result["generator"] = {}
    for shift in (True, False):
        name = "shift" if shift else "no_shift"
        run_dir = train(["experiment=rae_dit_cifar10", f"rae.ckpt={raes[0.8] / 'checkpoints' / 'last.ckpt'}",
                         f"rae.encoder_ckpt={mae_ckpt}", f"model.use_shift={str(shift).lower()}",
                         f"trainer.max_steps={args.dit_steps}", "trainer.max_epochs=-1", "seed=0",
                         "optim.warmup_steps=20", "callbacks.ema.decay=0.98",
                         f"model.sample_steps={args.sample_steps}"], out / f"dit_{name}")
        model, _ = load(run_dir, ema=True)
        labels = torch.arange(10).repeat_interleave(args.per_class)
        row = {"s": round(model.shift, 4), "loss_curve": loss_curve(run_dir),
               "val_velocity_mse": velocity_loss_at(model, x_val, y_val)}
        for guidance in (1.0, 2.0):
            g = torch.Generator().manual_seed(0)
            samples = torch.cat([model.sample(len(lab), labels=lab, guidance=guidance, generator=g)
                                 for lab in labels.split(100)])
            with torch.no_grad():
                pred = classifier(samples).argmax(1)
            row[f"sample_accuracy_cfg{guidance}"] = round((pred == labels).float().mean().item(), 4)
        torch.save(samples[::args.per_class][:10], out / f"samples_{name}.pt")
        result["generator"][name] = row
    result["seconds"] = round(time.time() - t_start)
    result["threads"] = args.threads
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
