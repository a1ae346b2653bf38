"""CPU proof for PHG-MAE on real video frames with derived modalities (Sobel edges, HSV, blurred luminance,
8-colour segmentation as the target). One training loop (every modality reconstructed + semantic CE under
whole-modality masking), then semantic mIoU on an unseen clip for: RGB-only input, all intermediate
modalities, K-mask ensembles (K = 1, 4, 16), and the same network at random initialisation.

--distill-epochs N also trains the RGB-only student (experiment=phg_mae_distill, width --student-width) on
that teacher's K-mask ensemble probabilities, and, as the control, the same student network trained on the
labels directly (experiment=phg_mae_multimodal with keep_prob 0: RGB only in, every modality out).

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_phg_mae.py --epochs 15
    AEFORGE_DATA_DIR=../shared/data python scripts/proof_phg_mae.py --epochs 15 --distill-epochs 15

--semi F instead trains two models on a labelled fraction F of the frames: with pseudo-label rounds
(PseudoLabelRounds every --pseudo-every epochs, 16-mask ensemble) and without; same seed and data.

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_phg_mae.py --epochs 30 --semi 0.05
Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from proof_common import build_parts, compose, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--labeled-fraction", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-epochs", type=int, default=0)
    ap.add_argument("--student-width", type=int, default=4)
    ap.add_argument("--teacher-k", type=int, default=8)
    ap.add_argument("--semi", type=float, default=None, help="labelled fraction for the pseudo-label comparison")
    ap.add_argument("--pseudo-every", type=int, default=10)
    ap.add_argument("--min-confidence", type=float, default=0.0)
    ap.add_argument("--arms", nargs="+", choices=["pseudo_rounds", "labelled_only"],
                    default=["pseudo_rounds", "labelled_only"], help="which of the two --semi runs")
    args = ap.parse_args()
    if args.semi is not None:
        return semi(args)

    from aeforge.eval.segmentation import SegmentationEnsembleEval

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
    if args.distill_epochs:
        import torch

        rgb_only = {"seg": SegmentationEnsembleEval(ks=[])}
        common = [f"trainer.max_epochs={args.distill_epochs}", f"seed={args.seed}",
                  f"data.labeled_fraction={args.labeled_fraction}", f"model.width={args.student_width}"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "teacher.ckpt"
            torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
            cfg = compose(["experiment=phg_mae_distill", f"model.teacher_checkpoint={path}",
                           f"model.teacher_k={args.teacher_k}", *common])
            student, dm, seconds = fit(cfg, dm)
        n = sum(p.numel() for p in student.net.parameters())
        result["distilled_student"] = {"params": n, "train_seconds": round(seconds, 1),
                                       **evaluate(student, dm, rgb_only)}
        cfg = compose(["experiment=phg_mae_multimodal", "model.keep_prob=0", *common])
        control, dm, seconds = fit(cfg, dm)
        result["student_on_labels"] = {"params": n, "train_seconds": round(seconds, 1),
                                       **evaluate(control, dm, rgb_only)}
    print(json.dumps(result, indent=2))


def semi(args) -> None:
    from hydra.utils import instantiate

    from aeforge.eval.segmentation import SegmentationEnsembleEval

    ev = {"seg": SegmentationEnsembleEval(ks=[16])}
    result = {"config": vars(args)}
    for every in [args.pseudo_every] * ("pseudo_rounds" in args.arms) + [0] * ("labelled_only" in args.arms):
        cfg = compose(["experiment=phg_mae_multimodal", f"trainer.max_epochs={args.epochs}", f"seed={args.seed}",
                       f"data.labeled_fraction={args.semi}", f"callbacks.pseudo_labels.every_n_epochs={every}",
                       f"callbacks.pseudo_labels.min_confidence={args.min_confidence}"])
        rounds = instantiate(cfg.callbacks.pseudo_labels)
        model, dm, seconds = fit(cfg, callbacks=[rounds])
        ds = dm.train_set
        unl = ~ds.labeled
        out = {"labelled_frames": int(ds.labeled.sum()), "unlabelled_frames": int(unl.sum()),
               "train_seconds": round(seconds, 1), **evaluate(model, dm, ev)}
        if every:  # the last round's maps against the true ones
            sem, pseudo = dm.make(ds.frames[unl])["sem"], ds.pseudo[unl].long()
            kept = pseudo != 255
            out["pseudo_label_coverage_last_round"] = float(kept.float().mean())
            out["pseudo_label_acc_last_round"] = float((pseudo == sem)[kept].float().mean())
        result["pseudo_rounds" if every else "labelled_only"] = out
        print(json.dumps({"pseudo_rounds" if every else "labelled_only": out}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
