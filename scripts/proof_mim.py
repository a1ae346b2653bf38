"""CPU proof for CAE, ColorMAE and MR-MAE on the CIFAR-10 subset (32 px, patch 4, 4,500 train / 500 val):
for each method, pretrain a small encoder (96-d x 4 blocks, 3 heads) for a few epochs with the method's
recipe, then compare the linear probe (BN + linear on frozen mean-pooled patch tokens, 30 epochs) and kNN
of the learned encoder against the *same architecture at random init*. Optional reference runs:
`mae` (= ColorMAE with white noise, i.e. MAE random masking) and `cae_no_align` (lambda = 0).

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_mim.py --epochs 4
    AEFORGE_DATA_DIR=../shared/data python scripts/proof_mim.py --runs colormae_green mae --epochs 4
Prints one JSON object. Single-threaded by default (AEFORGE_PROOF_THREADS)."""

from __future__ import annotations

import argparse
import json

from proof_common import build_parts, compose, evaluate, fit

SMALL_VIT = ["model.embed_dim=96", "model.depth=4", "model.num_heads=3", "model.pool=mean"]
SMALL_MAE_DECODER = ["model.decoder_embed_dim=64", "model.decoder_depth=1", "model.decoder_num_heads=2"]
SMALL_CAE_HEADS = ["model.decoder_embed_dim=96", "model.regressor_depth=1", "model.decoder_depth=1",
                   "model.decoder_num_heads=3"]

RUNS = {
    # name: (overrides, architecture family for the random-init reference)
    "cae": (["experiment=cae_cifar10", *SMALL_VIT, *SMALL_CAE_HEADS], "cae"),
    "cae_no_align": (["experiment=cae_cifar10", "objective.terms.align.weight=0", *SMALL_VIT,
                      *SMALL_CAE_HEADS], "cae"),
    "colormae_green": (["experiment=colormae_green_cifar10", *SMALL_VIT, *SMALL_MAE_DECODER], "vit"),
    "mae": (["experiment=colormae_green_cifar10", "masking.color=white", *SMALL_VIT, *SMALL_MAE_DECODER],
            "vit"),
    "mr_mae": (["experiment=mr_mae_cifar10", *SMALL_VIT, *SMALL_MAE_DECODER], "vit"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=["cae", "colormae_green", "mr_mae"], choices=sorted(RUNS))
    ap.add_argument("--probe-epochs", type=int, default=30)
    args = ap.parse_args()

    from aeforge.eval.probes import KNN, LinearProbe

    evaluators = {"linear": LinearProbe(epochs=args.probe_epochs, lr=1e-3), "knn": KNN(k=20)}
    common = [f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", "optim.warmup_epochs=1"]
    result: dict = {
        "config": vars(args),
        "encoder": "ViT 96-d x 4 blocks, 3 heads, patch 4, mean-pooled patch tokens",
        "data": "CIFAR-10 JPEG subset, 4500 train / 500 val",
    }
    random_done: set[str] = set()
    for name in args.runs:
        overrides, family = RUNS[name]
        cfg = compose([*overrides, *common])
        if family not in random_done:
            dm, random_model, _ = build_parts(cfg)
            result[f"random_init_{family}"] = evaluate(random_model, dm, evaluators)
            random_done.add(family)
        model, dm, seconds = fit(cfg)
        metrics = evaluate(model, dm, evaluators)
        metrics["train_seconds"] = round(seconds, 1)
        base = result[f"random_init_{family}"]
        metrics["linear_gain_over_random_init"] = round(metrics["linear/acc"] - base["linear/acc"], 4)
        result[name] = metrics
        print(json.dumps({name: metrics}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
