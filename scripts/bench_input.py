"""Images/s of the ImageNet-style input pipeline alone (HF datasets → JPEG decode → RandomResizedCrop →
uint8 batches), no model.

    python scripts/bench_input.py [--path /datasets/imagenet-1k] [--workers 8] [--batches 50] [--batch 128]

Without --path it writes a local parquet dataset of synthetic JPEGs at ImageNet's typical size
(500x375) to a temp dir and reads that. Prints JSON."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_parquet(n: int) -> str:
    import datasets
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="aeforge-input-")) / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    for split, count in (("train", n), ("validation", 16)):
        rows = []
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(np.roll(base, i * 7, axis=1)).save(buf, format="JPEG", quality=90)
            rows.append({"bytes": buf.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": rows, "label": [i % 1000 for i in range(count)]}, features=features)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return str(root.parent)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--decode-on-device", action="store_true", help="workers parse headers; decode on GPU/CPU")
    args = ap.parse_args()
    from aeforge.data.hf_images import HFImageDataModule

    path = args.path or synthetic_parquet(args.batch * (args.batches + 2))
    dm = HFImageDataModule(path=path, image_size=224, num_classes=1000, batch_size=args.batch,
                           num_workers=args.workers, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                           random_resized_crop=[0.2, 1.0], hflip=True, decode_on_device=args.decode_on_device)
    dm.setup("fit")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decode = lambda b: b  # noqa: E731
    if args.decode_on_device:  # decode_batch reads the device from the trainer; point it here directly
        from aeforge.data.hf_images import decode_batch

        decode = lambda b: decode_batch(b, dm.image_size, device)  # noqa: E731
    it = iter(dm.train_dataloader())
    decode(next(it))  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(args.batches):
        n += len(decode(next(it))["x"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({"path": path if args.path else "synthetic 500x375 JPEG parquet", "workers": args.workers,
                      "decode": str(device) if args.decode_on_device else "workers (PIL)",
                      "batch": args.batch, "images": n, "images_per_s": round(n / dt, 1),
                      "images_per_s_per_worker": round(n / dt / max(args.workers, 1), 1)}, indent=2))


if __name__ == "__main__":
    main()
