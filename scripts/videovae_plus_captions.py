"""Captions for the staged clips (VideoVAE+'s text condition on CPU), templated from what each video shows:

    "<subject>, <speed> motion, <direction>"

- subject: a hand-written description of the video, by its name (SUBJECTS below; looked at the frames);
- direction: the mean global translation of the content, from a least-squares fit of the brightness-constancy
  equation Ix*u + Iy*v + It = 0 over every pixel of each consecutive frame pair of the 64 px video (one (u, v)
  per pair, averaged); "moving left/right/up/down" by the larger component; "in place" below 0.05 px/frame
  or when still;
- speed: the mean absolute frame difference (0..255 scale): still < 2, slow < 5, else fast.
The caption is per video (the clips DataModule reads a table path -> caption), so every clip of a video shares
it. Writes aeforge/data/assets/video_clips_captions.csv and prints the measured numbers as JSON. Columns: `path`
(the video's name in the npz: data=video_clips reads it), `file` (its original in videos/orig/: data=webvid
reads it with data.path_format='{file}', as experiment=videovae_plus does under debug=smoke), `caption`.

    .venv/bin/python scripts/videovae_plus_captions.py [--npz $AEFORGE_DATA_DIR/videos/videos_64px.npz]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "aeforge" / "data" / "assets" / "video_clips_captions.csv"
SUBJECTS = {
    "bigbuckbunny": "an animated big rabbit on a grassy hill",
    "bikes": "a street with bicycles filmed by a hand-held camera",
    "carphone_pristine": "a man in a suit talking inside a car",
    "cockatoo": "a white cockatoo close to the camera",
    "newtonscradle": "a newton's cradle with swinging metal balls",
    "realshort": "a potted plant in front of a bright window",
}


def global_flow(video: np.ndarray) -> np.ndarray:
    """(T-1, 2) least-squares (u, v) translation in px/frame between consecutive grey frames."""
    g = video.astype(np.float64).mean(-1)
    out = []
    for a, b in zip(g[:-1], g[1:]):
        m = 0.5 * (a + b)
        iy, ix = np.gradient(m)
        it = b - a
        A = np.stack([ix.ravel(), iy.ravel()], 1)
        uv, *_ = np.linalg.lstsq(A, -it.ravel(), rcond=None)
        out.append(uv)
    return np.array(out)


def caption(name: str, video: np.ndarray) -> tuple[str, dict]:
    u, v = global_flow(video).mean(0)
    diff = float(np.abs(np.diff(video.astype(np.float32), axis=0)).mean())
    speed = "still" if diff < 2 else "slow" if diff < 5 else "fast"
    if speed == "still" or max(abs(u), abs(v)) < 0.05:
        direction = "in place"
    elif abs(u) >= abs(v):
        direction = "moving right" if u > 0 else "moving left"
    else:
        direction = "moving down" if v > 0 else "moving up"
    subject = SUBJECTS.get(name, name.replace("_", " "))
    return f"{subject}, {speed} motion, {direction}", {"u": float(u), "v": float(v), "abs_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--npz", default=os.path.join(os.environ.get("AEFORGE_DATA_DIR", str(ROOT.parent / "shared" /
                                                                                        "data")),
                                                 "videos", "videos_64px.npz"))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    data = np.load(args.npz)
    orig = Path(args.npz).parent / "orig"
    files = {f.stem: f.name for f in orig.iterdir()} if orig.is_dir() else {}
    rows, report = [], {}
    for name in sorted(k for k in data if not k.endswith("_fps")):
        text, stats = caption(name, data[name])
        rows.append((name, files.get(name, ""), text))
        report[name] = {"caption": text, **stats}
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "file", "caption"])
        w.writerows(rows)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
