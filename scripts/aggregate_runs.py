"""Mean ± std of every numeric metric over the runs of a sweep (e.g. the 10-seed paper protocol).

    python scripts/aggregate_runs.py logs/scgc_acm/multiruns/<time>            # JSON to stdout
    python scripts/aggregate_runs.py logs/scgc_acm/multiruns/<time> --keys acc nmi ari f1 --percent --markdown
    python scripts/aggregate_runs.py logs/apre_mss_adbench/multiruns/<time> --markdown   # one row per data.name

Reads `<dir>/*/metrics.json` (a multirun dir) or the given metrics.json files / run dirs directly. std is
the population std (ddof 0, numpy's default, as the clustering papers we compare with report it); `n`
says how many runs contributed. Runs without a metrics.json (crashed, still running) are listed under
`missing`, never silently averaged over.

Sweeps over more than seeds (`data.name=glob(*) seed=0,1,2`, `model=apre,tabular_ae`) are grouped by the
overrides that differ between runs (read from each run's `.hydra/overrides.yaml`), `seed` excepted, or by
`--by`: one row per value of `--rows` (default `data.name` when it varies), one column per metric and, when
other overrides vary too (several models), per value of those. Columns that report the same metric (the last
`/` part of the key, e.g. `auroc`) are then ranked per row (1 = highest; ties share the mean rank; `--lower`
for metrics where lower is better) and an `average rank` line closes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def collect(paths: list[str]) -> tuple[list[tuple[Path, dict]], list[str]]:
    runs, missing = [], []
    for p in map(Path, paths):
        if p.is_file():
            candidates = [p]
        elif (p / "metrics.json").is_file():
            candidates = [p / "metrics.json"]
        else:
            subdirs = sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")),
                             key=lambda d: (len(d.name), d.name)) if p.is_dir() else []
            if not subdirs:
                raise SystemExit(f"aggregate_runs: {p} is neither a metrics.json, a run dir nor a sweep dir")
            candidates = []
            for d in subdirs:
                (candidates.append(d / "metrics.json") if (d / "metrics.json").is_file() else missing.append(str(d)))
        runs += [(c, json.loads(c.read_text())) for c in candidates]
    return runs, missing


SKIP_PREFIXES = ("train/",)  # training curves, not results: left out of grouped tables by default (val/ stays)
SKIP_KEYS = {"epochs", "steps", "fit_seconds"}


def overrides_of(metrics_file: Path) -> dict[str, str]:
    """The command-line overrides of the run that wrote `metrics_file` ({} when its .hydra record is absent)."""
    record = metrics_file.parent / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return {}
    import yaml

    out = {}
    for item in yaml.safe_load(record.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def group_keys(runs: list[tuple[Path, dict]], by: list[str] | None) -> list[str]:
    """--by, else the overrides whose value differs between runs (seed excepted: it is what is averaged over)."""
    if by is not None:
        return by
    seen: dict[str, set] = {}
    for path, _ in runs:
        for k, v in overrides_of(path).items():
            seen.setdefault(k, set()).add(v)
    keys = [k for k, vals in seen.items() if k != "seed" and (len(vals) > 1 or any(
        k not in overrides_of(p) for p, _ in runs))]
    return sorted(keys, key=lambda k: (k != "data.name", k))


def rank_rows(table: dict[str, dict[str, float]], lower: bool) -> dict[str, float]:
    """table[row][column] -> mean rank of each column over the rows that have every column (1 = best)."""
    columns = sorted({c for row in table.values() for c in row})
    ranks = {c: [] for c in columns}
    for row in table.values():
        if len(row) != len(columns):
            continue
        for c in columns:  # average rank of ties: 1 + (#strictly better) + (#equal others) / 2
            better = sum((row[o] < row[c]) if lower else (row[o] > row[c]) for o in columns)
            ties = sum(row[o] == row[c] for o in columns) - 1
            ranks[c].append(1 + better + ties / 2)
    return {c: sum(r) / len(r) for c, r in ranks.items() if r}


def grouped(runs, keys: list[str] | None, by: list[str], rows_key: str | None, lower: bool) -> dict:
    """{"rows": {row: {column: stats}}, "average_rank": {metric: {column: rank}}} over groups of runs."""
    rows_key = rows_key or by[0]
    if rows_key not in by:
        raise SystemExit(f"aggregate_runs: --rows {rows_key} is not among the grouping keys {by}")
    others = [k for k in by if k != rows_key]
    groups: dict[tuple[str, str], list] = {}
    for run in runs:
        ov = overrides_of(run[0])
        label = ",".join(f"{k}={ov.get(k, '-')}" for k in others)
        groups.setdefault((ov.get(rows_key, "-"), label), []).append(run)
    keys = keys or sorted({k for _, m in runs for k, v in m.items() if isinstance(v, (int, float))
                           and not k.startswith(SKIP_PREFIXES) and k not in SKIP_KEYS})
    table: dict[str, dict[str, dict]] = {}
    for (row, label), members in sorted(groups.items()):
        for k, st in summarise(members, keys).items():
            table.setdefault(row, {})[f"{label} {k}".strip()] = st
    by_metric: dict[str, list[str]] = {}
    for col in {c for r in table.values() for c in r}:
        by_metric.setdefault(col.rsplit("/", 1)[-1], []).append(col)
    ranks = {m: rank_rows({r: {c: v["mean"] for c, v in cells.items() if c in cols} for r, cells in table.items()},
                          lower) for m, cols in by_metric.items() if len(cols) > 1}
    return {"rows_key": rows_key, "rows": table, "average_rank": ranks}


def grouped_markdown(result: dict, percent: bool) -> str:
    columns = sorted({c for r in result["rows"].values() for c in r})

    def cell(st: dict | None) -> str:
        if st is None:
            return "—"
        scale = 100.0 if percent and 0.0 <= st["min"] and st["max"] <= 1.0 else 1.0
        return f"{st['mean'] * scale:.2f} ± {st['std'] * scale:.2f}"

    lines = [f"| {result['rows_key']} | n | {' | '.join(columns)} |", "|---" * (len(columns) + 2) + "|"]
    for row, cells in result["rows"].items():
        n = max(st["n"] for st in cells.values())
        lines.append(f"| {row} | {n} | {' | '.join(cell(cells.get(c)) for c in columns)} |")
    for metric, ranks in sorted(result["average_rank"].items()):
        line = " | ".join(f"{ranks[c]:.2f}" if c in ranks else "" for c in columns)
        lines.append(f"| average rank ({metric}) | | {line} |")
    return "\n".join(lines)


def summarise(runs: list[tuple[Path, dict]], keys: list[str] | None = None) -> dict[str, dict[str, float]]:
    keys = keys or sorted({k for _, m in runs for k, v in m.items() if isinstance(v, (int, float))})
    out = {}
    for k in keys:
        vals = [float(m[k]) for _, m in runs if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        out[k] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="multirun dirs, run dirs or metrics.json files")
    ap.add_argument("--keys", nargs="*", help="metrics to summarise (default: every numeric key)")
    ap.add_argument("--percent", action="store_true", help="markdown: metrics within [0, 1] in %% (×100)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table row (mean ± std) instead of JSON")
    ap.add_argument("--by", nargs="*", help="group runs by these overrides (default: those that differ, not seed)")
    ap.add_argument("--rows", help="the grouping key whose values are the table rows (default: data.name / first)")
    ap.add_argument("--lower", action="store_true", help="ranks: lower is better")
    args = ap.parse_args(argv)
    runs, missing = collect(args.paths)
    if not runs:
        raise SystemExit(f"aggregate_runs: no metrics.json under {args.paths} (missing: {missing})")
    by = group_keys(runs, args.by)
    if by:
        result = grouped(runs, args.keys, by, args.rows, args.lower)
        present = {c.rsplit(" ", 1)[-1] for r in result["rows"].values() for c in r}
        unknown = [k for k in args.keys or [] if k not in present]
        if unknown:
            raise SystemExit(f"aggregate_runs: no run has {unknown}; keys present: {sorted(summarise(runs))}")
        if args.markdown:
            print(grouped_markdown(result, args.percent))
            if missing:
                print(f"missing: {missing}", file=sys.stderr)
        else:
            print(json.dumps({"runs": len(runs), "missing": missing, "by": by, **result}, indent=2))
        return
    stats = summarise(runs, args.keys)
    unknown = [k for k in args.keys or [] if k not in stats]
    if unknown:
        raise SystemExit(f"aggregate_runs: no run has {unknown}; keys present: {sorted(summarise(runs))}")
    if args.markdown:
        def cell(st: dict) -> str:  # --percent scales fractions only, not epochs or seconds
            scale = 100.0 if args.percent and 0.0 <= st["min"] and st["max"] <= 1.0 else 1.0
            return f"{st['mean'] * scale:.2f} ± {st['std'] * scale:.2f}"

        cells = [cell(stats[k]) for k in stats]
        print(f"| runs | {' | '.join(stats)} |\n| {len(runs)} | {' | '.join(cells)} |")
        if missing:
            print(f"missing: {missing}", file=sys.stderr)
    else:
        print(json.dumps({"runs": len(runs), "missing": missing, "metrics": stats}, indent=2))


if __name__ == "__main__":
    main()
