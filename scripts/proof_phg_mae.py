"""CPU proof for PHG-MAE on real video frames with derived modalities (Sobel edges, HSV, blurred luminance,
8-colour segmentation as the target). One training loop (every modality reconstructed + semantic CE under
whole-modality masking), then semantic mIoU on an unseen clip for: RGB-only input, all intermediate
modalities, K-mask ensembles (K = 1, 4, 16), and the same network at random initialisation.

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_phg_mae.py --epochs 15
Prints one JSON object."""

from __future__ import annotations

import argparse
import json

from proof_common import build_parts, compose, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--labeled-fraction", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from aeforge.models.phg_mae import SegmentationEnsembleEval

    cfg = compose(
        [
            "experiment=phg_mae_multimodal",
            f"trainer.max_epochs={args.epochs}",
            f"seed={args.seed}",
            f"data.labeled_fraction={args.labeled_fraction}",
        ]
    )
    ev = {"seg": SegmentationEnsembleEval(ks=[1, 4, 16])}
    dm, random_model, _ = build_parts(cfg)
    result = {"config": vars(args), "data": dm.describe(), "val_frames": len(dm.val_set)}
    result["random_init"] = evaluate(random_model, dm, ev)
    model, dm, seconds = fit(cfg, dm)
    result["train_seconds"] = round(seconds, 1)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["trained"] = evaluate(model, dm, ev)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
