"""CPU proofs for ARD-VAE and the prototype network (docs/methods/ard_vae.md, docs/methods/prototype_net.md);
prints one JSON object per case.

  ard_synthetic: x = frozen random MLP(s), s ~ U(-1, 1)^k (k known), 64 values stored as 8x8 uint8 images;
                 the ARD-VAE (MLP, L=16, beta 1) vs the same VAE with the fixed N(0, I) prior, active axes by the
                 99 % rule, per seed.
  ard_mnist:     experiment=ard_vae_mnist at CPU size: active axes, ranking, reconstruction with kept vs all axes.
  proto_mnist / proto_fashion: experiment=prototype_net_mnist (on data=fashion_mnist): test accuracy, decoded
                 prototypes (copied to --figures).

  python scripts/proof_ard_proto.py --cases ard_synthetic --seeds 0 1 2
  python scripts/proof_ard_proto.py --cases proto_mnist --epochs 5 --figures docs/methods/figures
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proof_common import compose  # noqa: E402


def synthetic_factors(path: Path, factors: int = 3, dim: int = 64, n_train: int = 10000, n_test: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Writes an npz of 8x8 uint8 'images' x = sigmoid(W2 tanh(W1 s + b1)) * 255, s ~ U(-1, 1)^factors, through a
    frozen random MLP (the only noise: uint8 rounding); returns the (mean, std) to normalise it with."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 1.5, (factors, 64)), rng.normal(0, 0.5, 64)
    w2 = rng.normal(0, 1 / np.sqrt(64), (64, dim)) * 2.0

    def make(n):
        s = rng.uniform(-1, 1, (n, factors))
        x = 1 / (1 + np.exp(-(np.tanh(s @ w1 + b1) @ w2)))
        return np.round(x * 255).astype(np.uint8).reshape(n, 1, 8, 8), s

    side = int(np.sqrt(dim))
    assert side * side == dim, "dim must be a square (stored as side x side images)"
    x, s = make(n_train)
    xt, st = make(n_test)
    # labels: the sign pattern of the factors (the DataModule wants labels; nothing here uses them)
    y, yt = ((s > 0) @ (2 ** np.arange(factors))), ((st > 0) @ (2 ** np.arange(factors)))
    np.savez(path, x=x, y=y.astype(np.int64), x_test=xt, y_test=yt.astype(np.int64))
    return float(x.mean() / 255), float(x.std() / 255)


def run_cfg(overrides: list[str], out: Path) -> dict:
    from omegaconf import open_dict

    from aeforge.train import run

    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    run(cfg)
    return json.loads((out / "metrics.json").read_text())


def ard_synthetic(seeds, epochs, factors, tmp: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        npz = tmp / f"synthetic_{seed}.npz"
        mean, std = synthetic_factors(npz, factors=factors, seed=seed)
        base = ["model=ard_vae_mlp", "task_name=ard_synthetic", "data=mnist_subset", f"data.path={npz}",
                f"data.mean=[{mean}]", f"data.std=[{std}]", "eval=ard_vae", "objective.terms.kl.weight=1.0",
                f"trainer.max_epochs={epochs}", f"seed={seed}", "trainer.enable_progress_bar=false", "logger=none",
                "~eval.evaluators.reconstruction", "eval.evaluators.ard.num_samples=2000"]
        for prior, extra in (("ard", ["callbacks=ard_vae", "callbacks.ard_prior.num_samples=2000"]),
                             ("fixed_N01", ["callbacks=default"])):
            m = run_cfg(base + extra, tmp / f"syn_{prior}_{seed}")
            rows.append({"case": "ard_synthetic", "prior": prior, "seed": seed, "true_factors": factors,
                         "epochs": epochs, "active_dims": m["ard/active_dims"],
                         "kept": [int(m[k]) for k in sorted(m) if k.startswith("ard/rank_")],
                         "recon_sse_all": m["ard/recon_sse_all"], "recon_sse_kept": m["ard/recon_sse_kept"],
                         "recon_sse_none": m["ard/recon_sse_none"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def ard_mnist(seeds, epochs, latent, filters, data, tmp: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        out = tmp / f"ard_mnist_{seed}"
        m = run_cfg(["experiment=ard_vae_mnist", f"data={data}", f"model.latent_dim={latent}",
                     f"model.filters={filters}", f"trainer.max_epochs={epochs}", f"seed={seed}",
                     "trainer.enable_progress_bar=false", "logger=none"], out)
        rows.append({"case": "ard_mnist", "data": data, "seed": seed, "latent_dim": latent, "filters": filters,
                     "epochs": epochs, "active_dims": m["ard/active_dims"],
                     "ranking": [int(m[k]) for k in sorted(m) if k.startswith("ard/rank_")],
                     **{k.split("/")[1]: m[k] for k in m if k.startswith("ard/recon_sse")},
                     "val_recon": m.get("val/recon"), "val_kl": m.get("val/kl"), "fit_seconds": m["fit_seconds"],
                     "run_dir": str(out)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def proto(name, data, seeds, epochs, figures: Path | None, tmp: Path, extra: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        out = tmp / f"{name}_{seed}"
        m = run_cfg(["experiment=prototype_net_mnist", f"data={data}", f"trainer.max_epochs={epochs}",
                     f"seed={seed}", "trainer.enable_progress_bar=false", "logger=none", *extra], out)
        row = {"case": name, "data": data, "seed": seed, "epochs": epochs, "overrides": extra,
               "test_accuracy": m["prototype_net/accuracy"], "classes_covered": m["prototype_net/classes_covered"],
               "prototype_classes": [int(m[k]) for k in sorted(m) if k.startswith("prototype_net/prototype_")],
               "fit_seconds": m["fit_seconds"], "run_dir": str(out)}
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            dest = figures / f"{name}_prototypes_seed{seed}.png"
            shutil.copy(out / "prototypes.png", dest)
            row["figure"] = str(dest)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["ard_synthetic"],
                   choices=["ard_synthetic", "ard_mnist", "proto_mnist", "proto_fashion"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="per case default when omitted")
    p.add_argument("--factors", type=int, default=3)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--filters", type=int, default=16)
    p.add_argument("--data", default="mnist", help="ard_mnist data group (mnist | mnist_subset)")
    p.add_argument("--figures", type=Path, default=None, help="copy prototypes.png here")
    p.add_argument("--out", type=Path, default=None, help="keep run dirs here (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="extra overrides for the prototype runs")
    a = p.parse_args()
    tmp = a.out or Path(tempfile.mkdtemp(prefix="proof_ard_proto_"))
    tmp.mkdir(parents=True, exist_ok=True)
    results = []
    for case in a.cases:
        if case == "ard_synthetic":
            results += ard_synthetic(a.seeds, a.epochs or 30, a.factors, tmp)
        elif case == "ard_mnist":
            results += ard_mnist(a.seeds, a.epochs or 5, a.latent, a.filters, a.data, tmp)
        elif case == "proto_mnist":
            results += proto("proto_mnist", "mnist", a.seeds, a.epochs or 5, a.figures, tmp, a.overrides)
        else:
            results += proto("proto_fashion", "fashion_mnist", a.seeds, a.epochs or 10, a.figures, tmp, a.overrides)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
