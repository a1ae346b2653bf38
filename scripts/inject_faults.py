"""Inject input faults many times and count how each ended (issue 12): a checkpoint carrying a pickle payload,
truncated or bit-flipped checkpoints, truncated or overwritten parquet shards, undecodable JPEGs in a good
shard, an .npz without its arrays. A fault is handled when it ends in the documented way (a clear error naming
the file, or skip-and-count) with no payload run and nothing on disk changed; anything else is a run lost.

    python scripts/inject_faults.py --trials 20          # prints JSON: fault, count, runs_lost
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from aeforge.checkpoints import CheckpointError, check_checkpoint, load_checkpoint
from aeforge.compose import compose_config
from aeforge.data.sources import DataFileError
from aeforge.train import build, run

TINY_IAT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def cfg(overrides: list[str], out: Path):
    return compose_config(overrides, output_dir=out, task_name="faults")


def named_error(fn, path: Path, types=(CheckpointError, DataFileError)) -> bool:
    """fn() raised one of `types` with `path` in its message (the fault is handled)."""
    try:
        fn()
    except types as e:
        return str(path) in str(e)
    except Exception:
        return False
    return False


def checkpoint_faults(work: Path, trials: int, rng: random.Random) -> list[tuple[str, int, int]]:
    from aeforge import evaluate

    real = work / "real"
    run(cfg(["debug=smoke", "evaluate=false"], real))
    good = (real / "checkpoints" / "last.ckpt").read_bytes()
    rows = []
    lost = 0
    for t in range(trials):  # payload: resume=auto, evaluation, model.pretrained in turn
        d = work / f"payload{t}"
        shutil.copytree(real, d)
        ckpt, marker = d / "checkpoints" / "last.ckpt", d / "RAN"
        state = torch.load(ckpt, weights_only=True)
        state["callbacks"]["x"] = Payload(marker)
        torch.save(state, ckpt)
        before = ckpt.read_bytes()
        if t % 3 == 0:
            ok = named_error(lambda d=d: run(cfg(["debug=smoke", "evaluate=false", "resume=auto"], d)), ckpt)
        elif t % 3 == 1:
            args = [f"ckpt={ckpt}", "eval=default", "model=ae", "data=mnist_subset", "debug=smoke"]
            ok = named_error(lambda args=args: evaluate.main(args), ckpt, (SystemExit,))
        else:
            from aeforge.models.fmae_iat import IATClassifier

            ok = named_error(lambda ckpt=ckpt: IATClassifier((1, 16, 16), 3, pretrained=str(ckpt), **TINY_IAT), ckpt)
        lost += not (ok and not marker.exists() and ckpt.read_bytes() == before)
    rows.append(("checkpoint with a pickle payload (resume=auto / aeforge-eval / model.pretrained)", trials, lost))

    lost = 0
    for t in range(trials):  # truncated at a random byte: the file a cut-short copy leaves
        p = work / f"trunc{t}.ckpt"
        p.write_bytes(good[: rng.randrange(0, len(good))])
        lost += not (named_error(lambda p=p: check_checkpoint(p), p) and named_error(lambda p=p: load_checkpoint(p), p))
    rows.append(("truncated checkpoint (random cut), resume= / evaluation", trials, lost))

    lost = 0
    for t in range(trials):  # one random byte flipped: silent corruption
        p = work / f"flip{t}.ckpt"
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 0xFF
        p.write_bytes(bytes(data))
        try:
            check_checkpoint(p)  # what resume= and evaluation do first
            state = load_checkpoint(p)
            # loaded: handled only if the weights equal the good ones (the flip hit padding) -- else undetected
            ref = torch.load(io.BytesIO(good), weights_only=True)["state_dict"]
            lost += not all(torch.equal(v, ref[k]) for k, v in state["state_dict"].items())
        except CheckpointError as e:
            lost += str(p) not in str(e)
        except Exception:
            lost += 1
    rows.append(("checkpoint with one flipped byte, resume= / evaluation", trials, lost))
    return rows


def data_faults(work: Path, trials: int, rng: random.Random) -> list[tuple[str, int, int]]:
    import datasets
    from PIL import Image

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (24, 32, 3), np.uint8)).save(
            buf, format="JPEG")
        return buf.getvalue()

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})

    def layout(root: Path, n: int, bad: set[int]) -> None:
        root.mkdir(parents=True)
        for split, m in (("train", n), ("validation", 4)):
            imgs = [{"bytes": jpeg(), "path": None} for _ in range(m)]
            for i in bad if split == "train" else ():
                imgs[i]["bytes"] = imgs[i]["bytes"][: rng.randrange(0, len(imgs[i]["bytes"]) // 2)]
            ds = datasets.Dataset.from_dict({"image": imgs, "label": [0] * m}, features=features)
            ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))

    hf = ["experiment=mae_mnist", "debug=smoke", "data=imagenet", "data.image_size=16", "data.batch_size=4"]
    rows = []
    lost = 0
    for t in range(trials):  # shard truncated at a random byte, or 64 bytes overwritten at a random place
        root = work / f"pq{t}"
        layout(root, 8, set())
        shard = root / "train-00000-of-00001.parquet"
        data = bytearray(shard.read_bytes())
        if t % 2 == 0:
            data = data[: rng.randrange(0, len(data))]
        else:
            at = rng.randrange(len(data) - 64)
            data[at : at + 64] = bytes(rng.randrange(256) for _ in range(64))
        shard.write_bytes(bytes(data))

        def load(root=root):
            dm = build(cfg([*hf, f"data.path={root}"], work).data, seed=0)
            dm.setup("fit")
            for split in (dm.train_set, dm.val_set):
                for i in range(len(split)):
                    dm.count_bad_rows({"bad_row": split[i]["bad_row"][None]})

        try:
            load()
            ok = True  # the damage hit image bytes only: skipped and counted, or harmless padding
        except (DataFileError, CheckpointError) as e:
            ok = "parquet" in str(e)
        except Exception:
            ok = False
        lost += not ok
    rows.append(("corrupt parquet shard (random cut / 64 random bytes)", trials, lost))

    lost = 0
    for t in range(trials):  # 0-3 undecodable JPEGs among 12 rows, limit 2
        bad = set(rng.sample(range(12), rng.randrange(0, 4)))
        root = work / f"jpg{t}"
        layout(root, 12, bad)
        dm = build(cfg([*hf, f"data.path={root}", "data.max_bad_images=2"], work).data, seed=0)
        dm.setup("fit")
        try:
            for i in range(len(dm.train_set)):
                dm.count_bad_rows({"bad_row": dm.train_set[i]["bad_row"][None]})
            ok = len(bad) <= 2 and dm.data_metrics()["data/bad_images"] == len(bad)
        except DataFileError as e:
            ok = len(bad) > 2 and str(root) in str(e)
        lost += not ok
    rows.append(("undecodable JPEGs (0-3 of 12) in a good shard, data.max_bad_images=2", trials, lost))

    lost = 0
    for t in range(trials):
        p = work / f"wrong{t}.npz"
        np.savez(p, **{f"k{t}": np.zeros((2, 4, 4), np.uint8)})
        lost += not named_error(lambda p=p: build(cfg(["data=mnist", f"data.path={p}"], work).data, seed=0), p)
    rows.append(("npz with wrong keys", trials, lost))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows = checkpoint_faults(Path(tmp) / "ckpt", args.trials, rng) + data_faults(Path(tmp) / "data", args.trials,
                                                                                   rng)
    print(json.dumps([{"fault": name, "count": n, "runs_lost": lost} for name, n, lost in rows], indent=1))


if __name__ == "__main__":
    main()
