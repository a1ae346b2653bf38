"""MAE ViT-B/16 pretraining throughput on one GPU: aeforge's train.py path vs a hand-written loop.

    python scripts/bench_mae_gpu.py [--model base|large] [--batch 256] [--steps 60] [--compile] [--skip-aeforge]
    python scripts/bench_mae_gpu.py --dry-run     # CPU, fp32, 32 px, 2 blocks, batch 2: the path and the JSON keys

Both sides use the same model class, uint8 224x224 batches normalised + flipped on the GPU, bf16 autocast
and fused AdamW; `--compile` applies torch.compile to both. Prints JSON with img/s and MFU (model FLOPs
of forward+backward, 3x forward, over the chip's dense bf16 peak)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# encoder width, depth, heads (decoder 512 x 8 x 16 for both, as the official code)
MODELS = {"base": (768, 12, 12), "large": (1024, 24, 16)}


def mae_flops_per_image(D=768, depth=12, Dd=512, ddepth=8, L=196, keep=49, p=16, c=3) -> float:
    """Forward FLOPs (2 per multiply-add) of MAE: encoder on keep+1 tokens, decoder on L+1 tokens."""

    def blocks(n_tok, d, n):
        per_block = 2 * n_tok * (12 * d * d) + 2 * 2 * n_tok * n_tok * d  # qkv+proj+mlp, then QK^T and AV
        return n * per_block

    patch = 2 * L * (p * p * c) * D
    enc = blocks(keep + 1, D, depth)
    dec = 2 * (keep + 1) * D * Dd + blocks(L + 1, Dd, ddepth) + 2 * (L + 1) * Dd * p * p * c
    return patch + enc + dec


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hand_written(size: str, batch: int, steps: int, warmup: int, compile_: bool, dev: torch.device,
                 image: int = 224, depth: int | None = None) -> float:
    from aeforge.data.images import random_resized_crop_flip
    from aeforge.models.mae import MAE
    from aeforge.objectives.reconstruction import MaskedPatchMSE

    width, full_depth, heads = MODELS[size]
    model = MAE((3, image, image), embed_dim=width, depth=depth or full_depth, num_heads=heads).to(dev)
    loss_fn = MaskedPatchMSE(norm_pix=True)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=dev.type == "cuda")
    data = torch.randint(0, 256, (8, batch, 3, image, image), dtype=torch.uint8, device=dev)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0 = time.perf_counter()
        x = random_resized_crop_flip(data[i % 8].float().div_(255), None, True)
        x = (x - mean) / std
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = loss_fn(fwd({"x": x}), {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def through_aeforge(size: str, batch: int, steps: int, warmup: int, compile_: bool, dev: torch.device,
                    image: int = 224, depth: int | None = None) -> float:
    from omegaconf import open_dict

    import aeforge.train as train_mod
    from aeforge.compose import compose_config

    out = tempfile.mkdtemp(prefix="aeforge-mae-bench-")
    workers = 4 if dev.type == "cuda" else 0
    cfg = compose_config(output_dir=out, task_name="bench_mae", overrides=[
            "experiment=mae_vit_base_imagenet", f"model=mae_vit_{size}", "data=synthetic", "data.channels=3",
            f"data.image_size={image}", f"data.num_train={batch * 8}", "data.num_val=8", "data.num_classes=10",
            f"data.batch_size={batch}", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
            "data.hflip=true", f"data.num_workers={workers}", f"trainer.accelerator={dev.type}", "trainer.devices=1",
            "trainer.strategy=auto", "trainer.accumulate_grad_batches=1",
            f"trainer.max_steps={warmup + steps}", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "callbacks=none", "logger=none",
            f"compile={str(compile_).lower()}", "optimized_metric=null", "evaluate=false",
            *([] if dev.type == "cuda" else ["trainer.precision=32-true"]),
            *([f"model.depth={depth}"] if depth else [])])
    with open_dict(cfg):
        cfg.paths.root_dir = out
        cfg.callbacks = {"timer": {"_target_": "aeforge.callbacks.StepTimer", "warmup": warmup}}
    train_mod.run(cfg)
    return json.loads((Path(out) / "metrics.json").read_text())["train/samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="base")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip-aeforge", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, fp32, 32 px, 2 encoder blocks, batch 2, 2 steps: the code path and the JSON keys")
    args = ap.parse_args()
    if args.dry_run:
        args.batch, args.steps, args.warmup, args.compile = 2, 1, 1, False
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        print(json.dumps({"error": "no CUDA device: this benchmark needs a GPU (--dry-run checks it on CPU)"}))
        return
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    width, depth, _ = MODELS[args.model]
    flops = 3 * mae_flops_per_image(D=width, depth=depth)
    # the dry run keeps the preset's width and heads, 2 encoder blocks, 32 px: the same code, in seconds
    image, depth = (32, 2) if args.dry_run else (224, None)
    ref = hand_written(args.model, args.batch, args.steps, args.warmup, args.compile, dev, image, depth)
    result = {"device": name, "model": f"vit_{args.model}_16", "batch": args.batch, "compile": args.compile,
              "handwritten_img_s": round(ref, 1), "gflops_per_img_train": round(flops / 1e9, 2)}
    if peak:
        result["handwritten_mfu"] = round(ref * flops / peak, 3)
    if not args.skip_aeforge:
        ours = through_aeforge(args.model, args.batch, args.steps, args.warmup, args.compile, dev, image, depth)
        result.update({"aeforge_img_s": round(ours, 1), "ratio_aeforge_over_handwritten": round(ours / ref, 3)})
        if peak:
            result["aeforge_mfu"] = round(ours * flops / peak, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
