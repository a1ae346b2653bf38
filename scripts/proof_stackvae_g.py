"""CPU proof for StackVAE-G (card §10): on NASA SMAP / MSL (all entities, one model each), point-adjusted and
unadjusted best F1, AUROC, AUPRC of StackVAE-G vs the dense window VAE under the same evaluator and budget; and
the learned graph's block structure on a synthetic series whose channels come in known groups.

    AEFORGE_DATA_DIR=../shared/data python scripts/proof_stackvae_g.py --datasets smap msl --epochs 3 --stride 10
    python scripts/proof_stackvae_g.py --datasets --graph-check      # the synthetic graph check only

The budget is CPU-sized (training windows every `--stride` steps, a few epochs; the card trains stride 1 for
256 epochs); by default every test point is scored (`--test-stride 1`); on a crowded machine `--test-stride 10`
scores every 10th point (the metrics are then those of that subsample). Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from proof_common import build_parts, compose, evaluate, fit_module


def real_data(dataset: str, model: str, args) -> dict:
    from aeforge.eval.anomaly_series import SeriesAnomalyDetection

    cfg = compose([f"experiment=stackvae_g_{dataset}", f"model={model}", f"trainer.max_epochs={args.epochs}",
                   f"data.stride={args.stride}", f"data.test_stride={args.test_stride}", f"seed={args.seed}",
                   "data.val_fraction=0"])
    dm, m, module = build_parts(cfg)
    seconds = fit_module(cfg, module, dm)
    t0 = time.time()
    metrics = evaluate(m, dm, {"series": SeriesAnomalyDetection()})
    return {"fit_s": round(seconds, 1), "score_s": round(time.time() - t0, 1), "train_windows": len(dm.train_set),
            "params": sum(p.numel() for p in m.parameters()),
            **{k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items()}}


def graph_check(args) -> dict:
    """3 groups × 4 channels sharing a latent signal: does the learned top-k graph link within groups?"""
    import numpy as np
    import torch

    from aeforge.data.timeseries import save_series_npz, synthetic_groups
    from aeforge.eval.anomaly_series import series_metrics

    out: dict = {}
    groups = np.asarray(synthetic_groups(seed=args.seed)["groups"])
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    chance = float(same[off].mean())  # share of off-diagonal pairs within a group: 3/11
    with tempfile.TemporaryDirectory() as tmp:
        arrays = synthetic_groups(groups=3, per_group=4, train_len=3000, test_len=2000, anomalies=12, seed=args.seed)
        path = Path(tmp) / "groups.npz"
        save_series_npz(path, arrays)
        for label, graph in (("stackvae_g", "true"), ("stackvae_no_graph", "false")):
            cfg = compose(["experiment=stackvae_g_smap", f"data.path={path}", "data.window=32", "data.stride=2",
                           "data.val_fraction=0", f"trainer.max_epochs={args.graph_epochs}", "model.k=3",
                           f"model.graph={graph}", f"seed={args.seed}"])
            dm, m, module = build_parts(cfg)
            seconds = fit_module(cfg, module, dm)
            m.eval()
            batch = dm.test_set.__getitems__(list(range(len(dm.test_set))))
            with torch.no_grad():
                scores = m.anomaly_score(batch).numpy()
            res = {k: round(v, 4) for k, v in series_metrics(scores, batch["anomaly"].numpy()).items()
                   if k in ("f1", "pa_f1", "auroc", "auprc")}
            res["fit_s"] = round(seconds, 1)
            if graph == "true":
                a = m.adjacency().detach().numpy()
                edges = (a > 0) & off
                res["within_group_weight_share"] = round(float(a[off & same].sum() / a[off].sum()), 4)
                res["within_group_edge_share"] = round(float(edges[same].sum() / edges.sum()), 4)
                res["chance_share"] = round(chance, 4)
                res["adjacency"] = np.round(a, 2).tolist()
            out[label] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="*", default=["smap", "msl"])
    ap.add_argument("--models", nargs="+", default=["stackvae_g", "window_vae"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--test-stride", type=int, default=1, help="score every n-th test point (1: all, the protocol)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graph-check", action="store_true")
    ap.add_argument("--graph-epochs", type=int, default=20)
    args = ap.parse_args()
    result: dict = {"config": vars(args)}
    for ds in args.datasets:
        result[ds] = {}
        for model in args.models:
            result[ds][model] = real_data(ds, model, args)
            print(json.dumps({ds: {model: result[ds][model]}}), file=sys.stderr, flush=True)  # progress
    if args.graph_check:
        result["synthetic_groups"] = graph_check(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
