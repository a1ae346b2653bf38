"""CPU proof for StRegA's ceVAE (card 11): Dice and AUROC of anomaly maps on the lesion proxies, ceVAE vs the
same conv VAE without the context-encoding branch (ce_factor = 0), several seeds. Prints JSON.

  python scripts/proof_cevae.py                      # both proxies, seeds 0 1 2
  python scripts/proof_cevae.py --data lesions_brainlike --seeds 0 --epochs 2

The recipes are experiment=strega_fashion_mnist / strega_brainlike with the card's CPU widths
(channels 8-16-32-64, z 64) and lr 1e-3 (the full recipe: 16-64-256-1024, z 1024, lr 1e-4)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proof_common import compose, evaluate, fit  # noqa: E402

EXPERIMENT = {"lesions_fashion_mnist": "strega_fashion_mnist", "lesions_brainlike": "strega_brainlike"}
VARIANTS = {"cevae": [], "vae": ["model.context_encoding=false", "objective.ce_factor=0"]}
KEYS = ("dice_best", "dice_val_threshold", "dice_postproc", "dice_postproc_per_image", "pixel_auroc",
        "pixel_auprc", "image_auroc")


def run_one(data: str, variant: str, seed: int, epochs: int, score: str) -> dict[str, float]:
    from aeforge.eval.anomaly_maps import AnomalyMapMetrics

    cfg = compose([f"experiment={EXPERIMENT[data]}", f"seed={seed}", f"trainer.max_epochs={epochs}",
                   "model.channels=[8,16,32,64]", "model.z_dim=64", "optim.lr=1e-3", f"model.score={score}",
                   *VARIANTS[variant]])
    model, dm, seconds = fit(cfg)
    m = evaluate(model, dm, {"maps": AnomalyMapMetrics()})
    return {"seconds": round(seconds, 1), **{k: m[f"maps/{k}"] for k in KEYS}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="+", default=list(EXPERIMENT), choices=list(EXPERIMENT))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--score", default="rec", choices=["rec", "combi"])
    args = p.parse_args()
    report = {"epochs": args.epochs, "seeds": args.seeds, "score": args.score, "widths": [8, 16, 32, 64],
              "z_dim": 64, "results": {}}
    runs: dict[str, list] = {f"{d}/{v}": [] for d in args.data for v in VARIANTS}
    for seed in args.seeds:  # seeds outermost: every finished seed is a complete ceVAE-vs-VAE comparison
        for data in args.data:
            for variant in VARIANTS:
                r = {"seed": seed, **run_one(data, variant, seed, args.epochs, args.score)}
                runs[f"{data}/{variant}"].append(r)
                print(json.dumps({f"{data}/{variant}": r}), file=sys.stderr, flush=True)
    for name, rs in runs.items():
        summary = {k: {"mean": statistics.mean(r[k] for r in rs), "std": statistics.pstdev(r[k] for r in rs)}
                   for k in KEYS}
        report["results"][name] = {"runs": rs, "summary": summary}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
