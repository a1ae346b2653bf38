"""Write one of our graph datasets and one of our cached SCGC autoencoders in the layout of the official
SCGC/SDCN code (`data/<name>.txt`, `data/<name>_label.txt`, `graph/<name><k>_graph.txt`, `data/<name>.pkl`),
so that the official `train.py` can be run from exactly the same start as an aeforge run (docs/methods/scgc.md,
"Cross-check against the official code"). Prints JSON: the files written and the official command to run.

    python scripts/export_scgc_official.py --npz $AEFORGE_DATA_DIR/usps/usps.npz --name usps --k 3 \
        --feature-scale 2 --ae logs/cache/scgc_ae/ae_<key>.pt --out /tmp/scgc_official

The AE file is the one a run's train.log names ("pre-trained AE loaded from ..." or written after
pre-training). Graphs with their own edges (acm, cite, dblp) take --k 0 (file `graph/<name>_graph.txt`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

SDCN_ENCODER = ("enc_1", "enc_2", "enc_3", "z_layer")
SDCN_DECODER = ("dec_1", "dec_2", "dec_3", "x_bar_layer")


def sdcn_state_dict(ae: dict) -> dict[str, torch.Tensor]:
    """Our cached AE ({"encoder", "decoder"}: nn.Sequential state dicts of 4 Linear layers each) under the
    SDCN `AE` module's parameter names."""
    out = {}
    for part, names in (("encoder", SDCN_ENCODER), ("decoder", SDCN_DECODER)):
        weights = [k for k in ae[part] if k.endswith(".weight")]
        if len(weights) != len(names):
            raise ValueError(f"the cached AE's {part} has {len(weights)} linear layers; SDCN's has {len(names)}")
        for name, key in zip(names, weights):
            out[f"{name}.weight"] = ae[part][key]
            out[f"{name}.bias"] = ae[part][key[: -len("weight")] + "bias"]
    return out


def export(npz: Path, name: str, k: int, feature_scale: float, ae_path: Path | None, out: Path) -> dict:
    arrays = np.load(npz)
    x = arrays["x"].astype(np.float64) * feature_scale
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "graph").mkdir(parents=True, exist_ok=True)
    files = {
        "features": out / "data" / f"{name}.txt",
        "labels": out / "data" / f"{name}_label.txt",
        "graph": out / "graph" / (f"{name}{k}_graph.txt" if k else f"{name}_graph.txt"),
    }
    np.savetxt(files["features"], x, fmt="%.8g")
    np.savetxt(files["labels"], arrays["y"].astype(np.int64), fmt="%d")
    edges = arrays[f"adj_k{k}"] if k and f"adj_k{k}" in arrays.files else arrays["adj"]
    np.savetxt(files["graph"], edges.astype(np.int64), fmt="%d")
    if ae_path is not None:
        files["ae"] = out / "data" / f"{name}.pkl"
        torch.save(sdcn_state_dict(torch.load(ae_path, map_location="cpu", weights_only=True)), files["ae"])
    return {
        "files": {key: str(p) for key, p in files.items()},
        "nodes": int(len(x)),
        "edges": int(len(edges)),
        "official": f"python train.py --name {name} --data_path {out} (+ the README's settings for {name})",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", type=Path, required=True, help="our graph file (x, y, adj[, adj_k<k>])")
    p.add_argument("--name", required=True, help="the official dataset name: usps, acm, cite, ...")
    p.add_argument("--k", type=int, default=0, help="kNN graph k (usps: 3); 0 = the dataset's own graph")
    p.add_argument("--feature-scale", type=float, default=1.0, help="usps: 2 (SDCN's [0, 2] range)")
    p.add_argument("--ae", type=Path, default=None, help="a cached AE (logs/cache/scgc_ae/ae_<key>.pt)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    for path in (a.npz, a.ae):
        if path is not None and not path.is_file():
            sys.exit(f"no such file: {path}")
    print(json.dumps(export(a.npz, a.name, a.k, a.feature_scale, a.ae, a.out), indent=1))


if __name__ == "__main__":
    main()
