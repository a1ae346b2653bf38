"""Mean ± std of every numeric metric over the runs of a sweep (e.g. the 10-seed paper protocol).

    python scripts/aggregate_runs.py logs/scgc_acm/multiruns/<time>            # JSON to stdout
    python scripts/aggregate_runs.py logs/scgc_acm/multiruns/<time> --keys acc nmi ari f1 --percent --markdown

Reads `<dir>/*/metrics.json` (a multirun dir) or the given metrics.json files / run dirs directly. std is
the population std (ddof 0, numpy's default, as the clustering papers we compare with report it); `n`
says how many runs contributed. Runs without a metrics.json (crashed, still running) are listed under
`missing`, never silently averaged over.
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
    args = ap.parse_args(argv)
    runs, missing = collect(args.paths)
    if not runs:
        raise SystemExit(f"aggregate_runs: no metrics.json under {args.paths} (missing: {missing})")
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
