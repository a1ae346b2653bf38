"""CPU comparison for MixedAE on the CIFAR-10 subset (32 px, patch 4): identical seeds and budgets for
(1) MAE r = 0.75, (2) naive mixing (mixing + unmixing reconstruction, no homologous attention, no
homologous contrastive, no segment embeddings), (3) MixedAE; linear probe and kNN on frozen cls features,
plus a random-init reference. The card's expected ordering is (2) <= (1) < (3); at this scale it may not
show. Also reports MixedAE's top-k homologous precision at the end of training.

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_mixed_ae.py --epochs 4
Prints one JSON object."""

from __future__ import annotations

import argparse
import json

from proof_common import build_parts, compose, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=["mae", "naive_mixing", "mixed_ae"])
    args = ap.parse_args()

    from aeforge.eval.probes import KNN, LinearProbe

    small = [
        "model.embed_dim=96",
        "model.depth=4",
        "model.num_heads=3",
        "model.decoder_embed_dim=64",
        "model.decoder_depth=1",
        "model.decoder_num_heads=2",
    ]
    common = [f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", "optim.warmup_epochs=1", *small]
    runs = {
        "mae": ["experiment=mixedae_cifar10", "model=mae", "masking.ratio=0.75"],
        "naive_mixing": [
            "experiment=mixedae_cifar10",
            "model.ha_layers=[]",
            "model.segment_embed=false",
            "objective.terms.homologous.weight=0",
        ],
        "mixed_ae": ["experiment=mixedae_cifar10"],
    }
    evaluators = {"linear": LinearProbe(epochs=100, lr=1e-2), "knn": KNN(k=20)}
    result: dict = {"config": vars(args), "model": "ViT 96-d x 4, decoder 64-d x 1, patch 4"}
    for i, name in enumerate(args.runs):
        cfg = compose([*runs[name], *common])
        if i == 0:
            dm, random_model, _ = build_parts(cfg)
            result["random_init"] = evaluate(random_model, dm, evaluators)
        model, dm, seconds = fit(cfg, dm)
        metrics = evaluate(model, dm, evaluators)
        metrics["train_seconds"] = round(seconds, 1)
        if name == "mixed_ae":
            import torch

            model.train()
            with torch.no_grad():
                batch = dm.val_set.__getitems__(list(range(128)))
                out = model({"x": dm.normalize(batch["x"])})
            metrics["topk_precision"] = float(out["topk_precision"])
            metrics["topk_precision_chance"] = 1 / model.sources
        result[name] = metrics
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
