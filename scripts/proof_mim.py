"""CPU proof for CAE, ColorMAE and MR-MAE on the CIFAR-10 subset (32 px, patch 4, 4,500 train / 500 val):
for each method, pretrain a small encoder (96-d x 4 blocks, 3 heads) for a few epochs with the method's
recipe, then compare the linear probe (BN + linear on frozen mean-pooled patch tokens, 30 epochs) and kNN
of the learned encoder against the *same architecture at random init* (the very initialisation the run
starts from: same seed and config). Optional reference runs:
`mae` (= ColorMAE with white noise, i.e. MAE random masking), `cae_no_align` (lambda = 0) and
`cae_tokens` (the token target; needs --tokenizer, a model=vq_tokenizer checkpoint of the same grid).

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_mim.py --epochs 15   # ~3 + 2 + 5 min
    AEFORGE_DATA_DIR=../shared/data python scripts/proof_mim.py --runs colormae_green mae --epochs 15
    AEFORGE_DATA_DIR=../shared/data python scripts/proof_mim.py --runs cae_tokens cae --epochs 15 \
        --tokenizer logs/vq_tokenizer_cifar10/runs/<time>/checkpoints/last.ckpt
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
    "cae": ["experiment=cae_cifar10", *SMALL_VIT, *SMALL_CAE_HEADS],
    "cae_tokens": ["experiment=cae_tokens_cifar10", *SMALL_VIT, *SMALL_CAE_HEADS],
    "cae_no_align": ["experiment=cae_cifar10", "objective.terms.align.weight=0", *SMALL_VIT,
                     *SMALL_CAE_HEADS],
    "colormae_green": ["experiment=colormae_green_cifar10", *SMALL_VIT, *SMALL_MAE_DECODER],
    "mae": ["experiment=colormae_green_cifar10", "masking.color=white", *SMALL_VIT, *SMALL_MAE_DECODER],
    "mr_mae": ["experiment=mr_mae_cifar10", *SMALL_VIT, *SMALL_MAE_DECODER],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=["cae", "colormae_green", "mr_mae"], choices=sorted(RUNS))
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--probe-lr", type=float, default=1e-3, help="linear probe AdamW lr")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--tokenizer", default=None, help="model=vq_tokenizer checkpoint for the cae_tokens run")
    args = ap.parse_args()
    if "cae_tokens" in args.runs and not args.tokenizer:
        ap.error("--runs cae_tokens needs --tokenizer <vq_tokenizer run>/checkpoints/last.ckpt")

    from aeforge.eval.probes import KNN, LinearProbe

    evaluators = {"linear": LinearProbe(epochs=args.probe_epochs, lr=args.probe_lr), "knn": KNN(k=20)}
    common = [f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", "optim.warmup_epochs=1"]
    result: dict = {
        "config": vars(args),
        "encoder": "ViT 96-d x 4 blocks, 3 heads, patch 4, mean-pooled patch tokens",
        "data": "CIFAR-10 JPEG subset, 4500 train / 500 val",
    }
    for name in args.runs:
        extra = [f"tokenizer.checkpoint={args.tokenizer}"] if name == "cae_tokens" else []
        cfg = compose([*RUNS[name], *common, *extra, *args.set])
        # the reference is the very initialisation the run starts from (same seed, same config)
        dm, random_model, _ = build_parts(cfg)
        base = evaluate(random_model, dm, evaluators)
        model, dm, seconds = fit(cfg, dm)
        metrics = evaluate(model, dm, evaluators)
        metrics["train_seconds"] = round(seconds, 1)
        metrics["random_init"] = base
        metrics["linear_gain_over_random_init"] = round(metrics["linear/acc"] - base["linear/acc"], 4)
        metrics["knn_gain_over_random_init"] = round(metrics["knn/acc"] - base["knn/acc"], 4)
        result[name] = metrics
        print(json.dumps({name: metrics}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
