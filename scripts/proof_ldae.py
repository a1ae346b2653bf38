"""LDAE proof on synthetic volumes (card 7's minimal reproduction; docs/methods/ldae.md): the three stages of
experiment=ldae_synthetic_volumes_{aekl,ddpm,} chained by ckpt=, then

- the semantic vector y of stage 3 recovers the binary label (logistic-regression ROC-AUC on the test split)
  and the continuous factor (ridge MAE in years, beside the MAE of predicting the train mean), compared with
  the same probes on the AEKL's flattened latent mean μ (stage 2's evaluation; 2048-d vs y's 64-d);
- DDIM encode (η = 0) → DDIM decode SSIM (20 steps, with y) close to the AEKL's own SSIM (its upper bound).

Prints one JSON object (per seed and the mean over seeds).
    python scripts/proof_ldae.py --seeds 0 1 --steps 300 400 400
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def run_stage(experiment: str, seed: int, steps: int, out: Path, ckpt: str | None, extra: list[str]) -> dict:
    from aeforge.compose import compose_config
    from aeforge.train import run

    overrides = [f"experiment={experiment}", f"seed={seed}", f"trainer.max_steps={steps}", "trainer.max_epochs=1000",
                 "trainer.check_val_every_n_epoch=1000", "logger=none", "callbacks.reconstruction_grid=null",
                 f"hydra.run.dir={out}", f"paths.output_dir={out}", *extra]
    if ckpt:
        overrides.append(f"ckpt={ckpt}")
    cfg = compose_config(overrides)
    start = time.time()
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.time() - start
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, nargs=3, default=[300, 400, 400], help="optimiser steps of stages 1, 2, 3")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every stage (e.g. data.num_volumes=320)")
    p.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = p.parse_args()
    logging.getLogger("aeforge").setLevel(logging.WARNING)
    root = Path(args.out or tempfile.mkdtemp(prefix="proof_ldae_"))
    keep = ("semantic_probe/roc_auc", "semantic_probe/accuracy", "semantic_probe/factor_mae",
            "semantic_probe/factor_mae_chance", "reconstruction/ssim_aekl", "reconstruction/ssim_ddim",
            "reconstruction/ssim_semantic_only", "reconstruction/mse_aekl", "reconstruction/mse_ddim")
    results = {}
    for seed in args.seeds:
        ckpt, per_stage = None, {}
        for stage, experiment, steps in zip(("aekl", "ddpm", "semantic"), ("ldae_synthetic_volumes_aekl",
                                            "ldae_synthetic_volumes_ddpm", "ldae_synthetic_volumes"), args.steps):
            out = root / f"seed{seed}" / stage
            m = run_stage(experiment, seed, steps, out, ckpt, args.extra)
            ckpt = str(out / "checkpoints" / "last.ckpt")
            per_stage[stage] = {k: m[k] for k in keep if k in m} | {"steps": m["steps"],
                                                                     "wall_seconds": round(m["wall_seconds"], 1)}
        results[f"seed{seed}"] = per_stage
    summary = {}
    for stage in ("aekl", "ddpm", "semantic"):
        keys = results[f"seed{args.seeds[0]}"][stage].keys()
        summary[stage] = {k: float(np.mean([results[f"seed{s}"][stage][k] for s in args.seeds])) for k in keys}
    print(json.dumps({"seeds": args.seeds, "steps": args.steps, "extra": args.extra, "runs": str(root),
                      "per_seed": results, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
