"""CPU proof of APRE + MSS (card 12) on real ADBench tables: per-set AUROC / AUPRC of

    AE (squared error) | AE + MSS | VAE | VAE + MSS | PAE with PRE (α=β=1) | APRE(0.5, 2) | APRE + MSS

(k = 10, m = 1 fixed), mean ± std over seeds (each seed: its own stratified 70/30 split and initialisation),
and the average rank of each detector over the sets (rank 1 = best AUROC; ties share the mean rank).

    python scripts/proof_apre_mss.py                               # 12 small sets x 3 seeds, JSON to stdout
    python scripts/proof_apre_mss.py --sets cardio thyroid --seeds 0 --epochs 200
    python scripts/proof_apre_mss.py --merge part1.json part2.json   # one table from runs over disjoint sets

Each run composes `experiment=apre_mss_adbench model=<m> data.name=<set> seed=<s>` as train.py does and builds
the same DataModule, model, objective and evaluators; only the loop differs: the recipe's full-batch Adam steps
(lr 1e-3, constant, no weight decay) in a plain torch loop, because Lightning's per-epoch overhead (~35 ms on the
shared CPU) would make 1000 one-step epochs x 108 fits take an hour."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proof_common import compose  # noqa: E402

SETS = ["Ionosphere", "Arrhythmia", "breastw", "cardio", "glass", "Hepatitis", "Lymphography", "Pima",
        "vertebral", "vowels", "WBC", "wine"]
# detector -> (model config, metric key prefix)
DETECTORS = {
    "AE": ("tabular_ae", "anomaly"),
    "AE+MSS": ("tabular_ae", "mss/k10_m1"),
    "VAE": ("tabular_vae", "anomaly"),
    "VAE+MSS": ("tabular_vae", "mss/k10_m1"),
    "PAE (PRE)": ("apre", "mss/x_a1_b1"),
    "APRE": ("apre", "anomaly"),
    "APRE+MSS": ("apre", "mss/k10_m1"),
}


def fit_and_score(model_name: str, dataset: str, seed: int, epochs: int) -> tuple[dict, float]:
    import torch
    from hydra.utils import instantiate

    from aeforge.train import model_inputs

    cfg = compose(["experiment=apre_mss_adbench", f"model={model_name}", f"data.name={dataset}", f"seed={seed}"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model, **model_inputs(cfg.model, dm))
    objective = instantiate(cfg.objective)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    batch = dm.parts["train"]  # full batch, as the recipe (data.batch_size=null)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        loss = objective(model(batch), batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    return instantiate(cfg.eval)(model, dm, torch.device("cpu")), seconds


def average_ranks(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """table[set][detector] = mean AUROC -> mean rank per detector (1 = best; ties share the mean rank)."""
    from scipy.stats import rankdata

    detectors = sorted({d for row in table.values() for d in row})
    ranks = [rankdata([-row[d] for d in detectors]) for row in table.values()]
    return {d: float(np.mean([r[i] for r in ranks])) for i, d in enumerate(detectors)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=SETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1000, help="full-batch epochs (the APRE code: 1000)")
    ap.add_argument("--merge", nargs="+", help="combine the JSON outputs of earlier runs (disjoint sets)")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        summary = {ds: row for part in parts for ds, row in part["per_set"].items()}
        head = {"sets": list(summary), "seeds": parts[0]["seeds"], "epochs": sorted({p["epochs"] for p in parts}),
                "mss": parts[0]["mss"], "fit_seconds": sum(p["fit_seconds"] for p in parts)}
        print(json.dumps(report(head, summary), indent=2))
        return
    runs: dict[str, dict[str, dict[str, list[float]]]] = {}
    seconds = 0.0
    for dataset in args.sets:
        for seed in args.seeds:
            for model_name in sorted({m for m, _ in DETECTORS.values()}):
                metrics, s = fit_and_score(model_name, dataset, seed, args.epochs)
                seconds += s
                for det, (m, prefix) in DETECTORS.items():
                    if m != model_name:
                        continue
                    cell = runs.setdefault(dataset, {}).setdefault(det, {"auroc": [], "auprc": []})
                    cell["auroc"].append(metrics[f"{prefix}/auroc"])
                    cell["auprc"].append(metrics[f"{prefix}/auprc"])
            print(f"{dataset} seed {seed}: " + ", ".join(f"{d} {runs[dataset][d]['auroc'][-1]:.3f}"
                                                          for d in DETECTORS), file=sys.stderr, flush=True)
    summary = {ds: {det: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                          for k, v in cell.items()} for det, cell in row.items()} for ds, row in runs.items()}
    head = {"sets": args.sets, "seeds": args.seeds, "epochs": args.epochs, "mss": {"k": 10, "m": 1},
            "fit_seconds": seconds}
    print(json.dumps(report(head, summary), indent=2))


def report(head: dict, summary: dict) -> dict:
    """Per-set table plus average ranks, mean metrics and MSS's relative AUROC gain per base detector."""
    result = {**head, "per_set": summary}
    for metric in ("auroc", "auprc"):
        table = {ds: {det: v[metric]["mean"] for det, v in row.items()} for ds, row in summary.items()}
        result[f"average_rank_{metric}"] = average_ranks(table)
        result[f"mean_{metric}"] = {d: float(np.mean([row[d] for row in table.values()])) for d in DETECTORS}
    # the paper's "+20 % for other AEs": MSS's relative AUROC change per base detector, averaged over sets
    result["mss_relative_auroc_gain"] = {
        base: float(np.mean([(summary[ds][f"{base}+MSS"]["auroc"]["mean"] / summary[ds][base]["auroc"]["mean"]) - 1
                             for ds in summary]))
        for base in ("AE", "VAE", "APRE")}
    return result


if __name__ == "__main__":
    main()
