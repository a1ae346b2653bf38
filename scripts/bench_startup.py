"""Wall time of `python train.py --cfg job` (compose + print, no torch import). Goal < 1.5 s.

    python scripts/bench_startup.py [--runs 5] [overrides...]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = sys.argv[1:]
    runs = 5
    if args[:1] == ["--runs"]:
        runs, args = int(args[1]), args[2:]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "job", *args], check=True,
                       capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"command": "python train.py --cfg job " + " ".join(args), "runs": runs,
                      "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                      "goal_s": 1.5}, indent=2))


if __name__ == "__main__":
    main()
