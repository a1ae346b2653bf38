"""CPU proof for ZO-AE-DS (card 13) on the staged CIFAR-10 subset; prints JSON.

The whole recipe chain through aeforge.train.run (the code path of train.py, checkpoints on disk):
0. the black-box classifier (experiment=zo_cifar10_classifier), certified as the undefended baseline;
1. the AE (experiment=zo_ae_cifar10);
2. experiment=zo_ae_ds_cifar10 with estimator fo (white box), rge (q queries), cge (2d queries), and ZO-DS
   (rge over the full image, no AE bottleneck), each certified with randomized smoothing (eval=certify).
CPU scale: a small classifier, d = 48 instead of 192, a small DnCNN, a few dozen ZO steps, small n.

    .venv/bin/python scripts/proof_zo_ae_ds.py --out /tmp/zo_proof
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AEFORGE_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def train(overrides: list[str], out: Path) -> dict:
    from omegaconf import open_dict

    from aeforge.compose import compose_config
    from aeforge.train import run

    cfg = compose_config(overrides, output_dir=out, task_name=out.name)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    t0 = time.time()
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = round(time.time() - t0, 1)
    return metrics


def main() -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/zo_ae_ds_proof")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clf-epochs", type=int, default=6)
    p.add_argument("--ae-epochs", type=int, default=10)
    p.add_argument("--zo-steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--queries", type=int, default=24, help="RGE q (also ZO-DS)")
    p.add_argument("--images", type=int, default=40, help="certified test images")
    p.add_argument("--n0", type=int, default=30)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--variants", default="fo,rge,cge,zo_ds")
    args = p.parse_args()
    out = Path(args.out)
    clf_widths, ae_widths = "[16,32,64]", "[12,24,48,48]"
    certify = ["eval=certify", "sigma=0.25", f"eval.max_samples={args.images}", f"eval.evaluators.certify.n0={args.n0}",
               f"eval.evaluators.certify.n={args.n}", f"eval.evaluators.certify.alpha={args.alpha}",
               "eval.evaluators.certify.batch_size=330", "eval.evaluators.certify.radii=[0.0,0.25,0.5]"]
    quiet = ["logger=none", "callbacks.reconstruction_grid=null", "callbacks.loss_curve=null",
             "trainer.enable_progress_bar=false", f"seed={args.seed}"]
    results: dict = {"settings": vars(args) | {"classifier_widths": clf_widths, "ae_widths": ae_widths,
                                                "sigma": 0.25, "denoiser": "DnCNN depth 4 width 16"}}
    clf = train(["experiment=zo_cifar10_classifier", f"model.widths={clf_widths}",
                 f"trainer.max_epochs={args.clf_epochs}", *certify, *quiet], out / "classifier")
    results["classifier (no defence)"] = clf
    ae = train(["experiment=zo_ae_cifar10", f"model.widths={ae_widths}", f"trainer.max_epochs={args.ae_epochs}",
                *quiet], out / "ae")
    results["ae"] = {k: v for k, v in ae.items() if k.startswith("val/") or k == "wall_s"}
    d = 48
    spend = {"fo": "white box", "rge": f"q={args.queries}: {args.queries + 1} per sample",
             "cge": f"2d={2 * d}: {2 * d + 1} per sample", "zo_ds": f"q={args.queries} over 3072 dims"}
    for name in args.variants.split(","):
        est = {"fo": "fo", "rge": "rge", "cge": "cge", "zo_ds": "rge"}[name]
        zo = [f"zo.estimator={est}", f"zo.queries={args.queries}", f"zo.bottleneck={name != 'zo_ds'}"]
        m = train(["experiment=zo_ae_ds_cifar10", f"model.classifier_ckpt={out / 'classifier/checkpoints/last.ckpt'}",
                   f"model.ae_ckpt={out / 'ae/checkpoints/last.ckpt'}", f"model.classifier_widths={clf_widths}",
                   f"model.ae_widths={ae_widths}", "model.denoiser_depth=4", "model.denoiser_width=16", *zo,
                   f"trainer.max_steps={args.zo_steps}", f"data.batch_size={args.batch}", "trainer.limit_val_batches=2",
                   *certify, *quiet], out / name)
        results[name] = m | {"queries_per_step": spend[name]}
        print(json.dumps({name: {k: v for k, v in m.items() if "certif" in k or k in ("wall_s", "train/ce_epoch")}}),
              flush=True)
    table = {k: {r: v.get(f"certify/certified_acc@{r}") for r in ("0", "0.25", "0.5")}
             for k, v in results.items() if isinstance(v, dict) and "certify/images" in v}
    results["table"] = table
    (out / "proof.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
