"""CPU proof for Bird-MAE on real audio (FSDD spoken digits): the spectrogram MAE's frozen encoder beats the
same architecture at random initialisation under a linear probe and a prototypical probe (digit labels).

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_bird_mae.py --epochs 20

Prints one JSON object: pretraining seconds, final train loss, and for `pretrained` and `random_init` the
linear-probe, kNN and prototypical-probe val accuracies (and prototypical macro mAP)."""

from __future__ import annotations

import argparse
import json

from proof_common import build_parts, compose, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--save",
        default="/tmp/aeforge-proof/bird_mae_fsdd.pt",
        help="where to save the pretrained model's state dict (reused by proof_iat.py)",
    )
    args = ap.parse_args()

    from aeforge.eval.probes import KNN, LinearProbe
    from aeforge.eval.prototypical import PrototypicalProbe

    cfg = compose(
        [
            "experiment=bird_mae_fsdd",
            f"trainer.max_epochs={args.epochs}",
            f"seed={args.seed}",
            f"optim.warmup_epochs={max(1.0, 0.09375 * args.epochs)}",
        ]
    )
    evaluators = {
        "linear": LinearProbe(epochs=100, lr=1e-2),
        "knn": KNN(k=20),
        "proto": PrototypicalProbe(epochs=args.probe_epochs, num_prototypes=5),
    }

    dm, random_model, _ = build_parts(cfg)
    result = {
        "config": {"epochs": args.epochs, "seed": args.seed, "data": "fsdd (recording split, 2700/300)"}
    }
    result["random_init"] = evaluate(random_model, dm, evaluators)
    model, dm, seconds = fit(cfg, dm)
    result["pretrain_seconds"] = round(seconds, 1)
    if args.save:
        from pathlib import Path

        import torch

        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save)
    result["pretrained"] = evaluate(model, dm, evaluators)
    result["delta_linear_acc"] = result["pretrained"]["linear/acc"] - result["random_init"]["linear/acc"]
    result["delta_proto_acc"] = result["pretrained"]["proto/acc"] - result["random_init"]["proto/acc"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
