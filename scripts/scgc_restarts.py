"""Which label-free criterion of an SCGC start predicts the final ACC? (stages.scgc_pretrain.select)

For each AE seed: one whole SCGC run from that AE (`train.py experiment=<exp> stages.scgc_pretrain.seed=<s>`,
callbacks and evaluation off: only the per-epoch ACC history is needed), and the criteria the restarts compare,
computed on the same cached AE: the k-means silhouette on z, the k-means inertia over z's total sum of squares,
the AE's reconstruction MSE. Prints JSON: one row per seed, and each criterion's Spearman correlation with the
final and the best ACC (sign-adjusted: > 0 means the criterion's preferred AE tends to score higher), plus what
`restarts=N` with one AE per run seed (`stages.scgc_pretrain.seed=null`: run seed s tries AE seeds s..s+N-1)
would have kept for each run seed whose N AEs were measured, per criterion, next to no restarts.

    AEFORGE_DATA_DIR=../shared/data python scripts/scgc_restarts.py --experiment scgc_acm --seeds 0-9 --restarts 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from aeforge.cli import metrics_json_of

ROOT = Path(__file__).resolve().parents[1]


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run_seed(experiment: str, seed: int, work: Path, epochs: int) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", "seed=0",
           f"stages.scgc_pretrain.seed={seed}", f"stages.scgc_pretrain.cache_dir={work / 'ae_cache'}",
           f"paths.log_dir={work / 'logs'}", f"task_name=ae{seed}", "callbacks=none", "logger=none",
           "evaluate=false", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"AE seed {seed}: train.py failed:\n{proc.stderr[-3000:]}")
    m = json.loads(metrics_json_of(proc.stdout).read_text())
    return {k: m[k] for k in ("acc", "best_acc", "init_acc")}


def criteria_of(experiment: str, seed: int, work: Path) -> dict:
    """The criteria of the AE `seed` as the stage computes them for restarts (the AE comes from the cache)."""
    import logging

    import torch

    from aeforge.compose import compose_config
    from aeforge.train import build, model_inputs

    cfg = compose_config([f"experiment={experiment}", f"stages.scgc_pretrain.cache_dir={work / 'ae_cache'}",
                          "stages.scgc_pretrain.restarts=2"], output_dir=work / "criteria", task_name="criteria")
    datamodule = build(cfg.data, seed=0)
    model = build(cfg.model, **model_inputs(cfg.model, datamodule))
    stage = build(cfg.stages.scgc_pretrain)
    x = datamodule.features.to(torch.device("cpu"))
    return stage.candidate(model, x, seed, 0, logging.getLogger("criteria"))["criteria"]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="scgc_acm")
    ap.add_argument("--seeds", default="0-9", help="AE seeds, e.g. 0-9")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--restarts", type=int, default=3, help="block size for the what-would-be-kept table")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="scgc-restarts-"))
    rows = []
    for seed in seeds_of(a.seeds):
        row = {"ae_seed": seed, **run_seed(a.experiment, seed, work, a.epochs), **criteria_of(a.experiment, seed, work)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    sign = {"silhouette": 1, "inertia": -1, "mse": -1, "init_acc": 1}  # init_acc reads labels: a reference only
    corr = {c: {t: round(s * spearman([r[c] for r in rows], [r[t] for r in rows]), 3) for t in ("acc", "best_acc")}
            for c, s in sign.items()}
    # run seed s with restarts=N tries AE seeds s..s+N-1 (stages.scgc_pretrain.seed=null)
    windows = [rows[i:i + a.restarts] for i in range(len(rows) - a.restarts + 1)]

    def summary(picks: list[dict]) -> dict:
        accs, bests = [r["acc"] for r in picks], [r["best_acc"] for r in picks]
        return {"acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                "best_acc_mean": float(np.mean(bests)), "best_acc_std": float(np.std(bests)),
                "ae_seeds": [r["ae_seed"] for r in picks]}

    kept = {c: summary([max(w, key=lambda r: s * r[c]) for w in windows]) for c, s in sign.items()}
    kept["no restarts (AE seed = run seed)"] = summary([w[0] for w in windows])
    print(json.dumps({"experiment": a.experiment, "epochs": a.epochs, "cpu_count": os.cpu_count(), "rows": rows,
                      "spearman_with": corr, f"restarts={a.restarts}": kept, "work": str(work)}, indent=2))


if __name__ == "__main__":
    main()
