"""The deep-linear JEPA-vs-MAE table and plot from a sweep (card 8; docs/methods/deep_linear_jepa.md):

    python train.py -m experiment=deep_linear_jepa_vs_mae depth=1,2,3 objective=linear_jepa,linear_mae
    python scripts/jepa_vs_mae_table.py logs/deep_linear_jepa_vs_mae/multiruns/<time>            # JSON
    python scripts/jepa_vs_mae_table.py logs/deep_linear_jepa_vs_mae/multiruns/<time> --markdown # table

One row per (objective, depth): the learning time of each feature measured on GD (t_gd, t = step · lr) and the
ODE's (t_ode), the learning order (features sorted by time; "-" marks a feature not learned in the run), and
per group of features sharing λ the ratio t(lowest ρ) / t(highest ρ) (`rho_gap`: > 1 means the high-ρ feature is
learned first). Writes the plot (learning time against depth per feature, GD points on ODE lines; learning
curves w̄_i / w̄_i* at the deepest depth) to --plot (default <sweep>/jepa_vs_mae.png). Jobs without a
metrics.json are listed under `missing`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml

NAMES = {"embedding": "JEPA", "view": "MAE"}


def load_runs(sweep: Path) -> tuple[list[dict], list[str]]:
    runs, missing = [], []
    jobs = sorted((d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: (len(d.name), d.name)) if sweep.is_dir() else []
    if not jobs:
        raise SystemExit(f"jepa_vs_mae_table: {sweep} holds no job folders (give a multirun folder)")
    for job in jobs:
        metrics, config = job / "metrics.json", job / "config_resolved.yaml"
        if not (metrics.is_file() and config.is_file()):
            missing.append(str(job))
            continue
        cfg = yaml.safe_load(config.read_text())
        try:
            target = cfg["objective"]["terms"]["ssl"]["target"]
        except (KeyError, TypeError):
            raise SystemExit(f"jepa_vs_mae_table: {config} is not a deep-linear run (no objective.terms.ssl.target; "
                             f"run experiment=deep_linear_jepa_vs_mae)") from None
        m = json.loads(metrics.read_text())
        lam, rho = cfg["data"]["lam"], cfg["data"]["rho"]
        runs.append({
            "job": job.name, "objective": NAMES[target], "target": target, "depth": int(cfg["model"]["depth"]),
            "init_scale": float(cfg["model"]["init_scale"]), "lr": float(cfg["optim"]["lr"]),
            "steps": int(m.get("steps", 0)), "lam": lam, "rho": rho,
            "t_gd": [m.get(f"learning_times/t_gd_{i}", math.nan) for i in range(len(lam))],
            "t_ode": [m.get(f"learning_times/t_ode_{i}", math.nan) for i in range(len(lam))],
            "curves": str(job / "learning_curves.csv") if (job / "learning_curves.csv").is_file() else None,
        })
    runs.sort(key=lambda r: (r["objective"] != "JEPA", r["depth"]))
    return runs, missing


def order(times: list[float]) -> str:
    learned = sorted((t, i) for i, t in enumerate(times) if math.isfinite(t))
    rest = [str(i) for i, t in enumerate(times) if not math.isfinite(t)]
    return "<".join(str(i) for _, i in learned) + (" | -" + ",".join(rest) if rest else "")


def rho_gaps(lam: list[float], rho: list[float], times: list[float]) -> dict[str, float]:
    gaps = {}
    for value in sorted(set(lam)):
        idx = [i for i, v in enumerate(lam) if v == value]
        if len(idx) < 2:
            continue
        lo, hi = min(idx, key=lambda i: rho[i]), max(idx, key=lambda i: rho[i])
        gaps[f"lam={value:g}"] = times[lo] / times[hi] if times[hi] else math.nan
    return gaps


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        rel = [abs(g - o) / o if math.isfinite(g) and math.isfinite(o) and o else math.nan
               for g, o in zip(r["t_gd"], r["t_ode"])]
        rows.append({
            "objective": r["objective"], "depth": r["depth"], "t_gd": r["t_gd"], "t_ode": r["t_ode"],
            "max_rel_err": max((e for e in rel if math.isfinite(e)), default=math.nan),
            "order_gd": order(r["t_gd"]), "order_ode": order(r["t_ode"]),
            "rho_gap_gd": rho_gaps(r["lam"], r["rho"], r["t_gd"]),
            "rho_gap_ode": rho_gaps(r["lam"], r["rho"], r["t_ode"]),
            "steps": r["steps"], "lr": r["lr"], "init_scale": r["init_scale"],
        })
    return rows


def markdown(rows: list[dict], runs: list[dict]) -> str:
    lam, rho = runs[0]["lam"], runs[0]["rho"]
    feats = [f"f{i} (λ={a:g}, ρ={b:g})" for i, (a, b) in enumerate(zip(lam, rho))]
    head = ["objective", "L", *feats, "max rel. err", "order (GD)", "order (ODE)", "ρ-gap GD (ODE)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{g:.4g} ({o:.4g})" for g, o in zip(row["t_gd"], row["t_ode"])]
        gaps = "; ".join(f"{k}: {row['rho_gap_gd'][k]:.3f} ({row['rho_gap_ode'][k]:.3f})" for k in row["rho_gap_gd"])
        lines.append("| " + " | ".join([row["objective"], str(row["depth"]), *cells, f"{row['max_rel_err']:.2%}",
                                         row["order_gd"], row["order_ode"], gaps]) + " |")
    return "\n".join(lines)


def read_curves(path: str, n: int) -> tuple[list[float], list[list[float]]]:
    t, w = [], [[] for _ in range(n)]
    with open(path) as f:
        for row in csv.DictReader(f):
            i = int(row["feature"])
            if i == 0:
                t.append(float(row["t"]))
            w[i].append(float(row["wbar_over_fixed_point"]))
    return t, w


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from aeforge.eval.deep_linear import fixed_point, ode_curve

    objectives = [o for o in ("JEPA", "MAE") if any(r["objective"] == o for r in runs)]
    fig, axes = plt.subplots(2, len(objectives), figsize=(5.2 * len(objectives), 7.2), squeeze=False)
    lam, rho = runs[0]["lam"], runs[0]["rho"]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(lam)))
    for col, obj in enumerate(objectives):
        rs = sorted((r for r in runs if r["objective"] == obj), key=lambda r: r["depth"])
        ax = axes[0, col]
        depths = [r["depth"] for r in rs]
        for i in range(len(lam)):
            ax.plot(depths, [r["t_ode"][i] for r in rs], "--", color=colors[i], lw=1)
            ax.plot(depths, [r["t_gd"][i] for r in rs], "o", color=colors[i], label=f"f{i}: λ={lam[i]:g}, ρ={rho[i]:g}")
        ax.set(yscale="log", xlabel="encoder depth L", ylabel="learning time t* (w̄ = ½ w̄*)",
               title=f"{obj}: GD (points) vs ODE (dashed)", xticks=depths)
        ax.legend(fontsize=7)
        deepest = rs[-1]
        ax = axes[1, col]
        if deepest["curves"]:
            t, w = read_curves(deepest["curves"], len(lam))
            t = np.asarray(t)
            for i in range(len(lam)):
                ax.plot(t, w[i], color=colors[i], lw=1.5, label=f"f{i}")
                ref = ode_curve(lam[i], rho[i], deepest["depth"], deepest["init_scale"],
                                "jepa" if obj == "JEPA" else "mae", t)
                ax.plot(t, ref / fixed_point(rho[i], deepest["depth"], "jepa" if obj == "JEPA" else "mae"),
                        ":", color="k", lw=0.8)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set(xlabel="t = step · lr", ylabel="w̄_i / w̄_i*", ylim=(-0.05, 1.1),
               title=f"{obj}, L={deepest['depth']}: learning curves (ODE dotted)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=64)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a multirun folder of experiment=deep_linear_jepa_vs_mae")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table instead of JSON")
    ap.add_argument("--plot", help="where to write the plot (default <sweep>/jepa_vs_mae.png); 'none' for none")
    args = ap.parse_args(argv)
    sweep = Path(args.sweep)
    runs, missing = load_runs(sweep)
    if not runs:
        raise SystemExit(f"jepa_vs_mae_table: no finished job under {sweep} (missing: {missing})")
    rows = table(runs)
    plot_path = None if args.plot == "none" else Path(args.plot or sweep / "jepa_vs_mae.png")
    if plot_path is not None:
        plot(runs, plot_path)
    if args.markdown:
        print(markdown(rows, runs))
        if missing:
            print(f"missing: {missing}", file=sys.stderr)
    else:
        print(json.dumps({"features": {"lam": runs[0]["lam"], "rho": runs[0]["rho"]}, "rows": rows,
                          "missing": missing, "plot": str(plot_path) if plot_path else None}, indent=2))


if __name__ == "__main__":
    main()
