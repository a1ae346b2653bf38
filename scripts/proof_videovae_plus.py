"""VideoVAE+ proof on the staged clips (CPU): the held-out clip's PSNR/SSIM/CF for the full model and three
ablations, against the frame-repeat baseline and the per-frame image AE at the same latent size
(scripts/video_baselines.py, same evaluator: aeforge/eval/video_recon.py). Prints JSON.

  full            experiment=videovae_plus_clips (temporal compressor, text, joint image-video batches)
  no_compressor   model.temporal_compressor=false model.z_channels=4   (the spatial AE alone, same latent size)
  no_text         model.text_encoder=null
  video_only      data.images=null data.image_ratio=0

Each run: the recipe's model, data and objective, trained by a plain Adam loop (the recipe's optimiser settings;
no Lightning, to fit the budget) for --steps batches, one torch thread (a loaded 2-core machine loses most of its
time to OpenMP spinning with two). Effects are reported per seed as full - ablation (PSNR dB).

    .venv/bin/python scripts/proof_videovae_plus.py --steps 200 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proof_common import compose  # noqa: E402
from video_baselines import baselines, evaluate  # noqa: E402

VARIANTS = {
    "full": [],
    "no_compressor": ["model.temporal_compressor=false", "model.z_channels=4"],
    "no_text": ["model.text_encoder=null"],
    "video_only": ["data.images=null", "data.image_ratio=0"],
}
KEYS = ("psnr", "ssim", "cf", "latent_values_per_clip")


def batches(dm):
    epoch = 0
    while True:
        loader = dm.train_dataloader()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_eval(overrides: list[str], seed: int, steps: int) -> tuple[dict, list[str]]:
    from hydra.utils import instantiate

    from aeforge.models.base import RunProgress

    cfg = compose(["experiment=videovae_plus_clips", *overrides, f"seed={seed}"])
    torch.manual_seed(seed)
    dm = instantiate(cfg.data, seed=seed)
    model = instantiate(cfg.model, input_shape=dm.input_shape)
    objective = instantiate(cfg.objective)
    o = cfg.optim
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas))
    warm = int(o.warmup_steps or 0)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else cosine(s))
    model.train()
    objective.train()
    t0, images, losses = time.time(), 0, []
    for step, batch in zip(range(steps), batches(dm)):
        batch = dm.device_batch(batch, torch.device("cpu"), augment=True)
        batch["progress"] = RunProgress.of(step, steps, 0)
        images += int(bool(batch["is_image"].all()))
        loss = objective(model(batch), batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.time() - t0
    res = evaluate(model.eval(), dm, lpips=False)
    out = {k: res[f"video_recon/{k}"] for k in KEYS}
    out.update(train_seconds=round(seconds, 1), steps=steps, image_batches=images,
               loss_first=losses[0], loss_last=sum(losses[-10:]) / len(losses[-10:]),
               params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return out, list(overrides_data(cfg))


def overrides_data(cfg):
    d = cfg.data
    return [f"data.frames={d.frames}", f"data.resize={d.resize}", f"data.image_size={d.image_size}"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    data_overrides = None
    for seed in args.seeds:
        for v in args.variants:
            runs[v][seed], data_overrides = train_eval(VARIANTS[v], seed, args.steps)
            print(f"[proof] {v} seed {seed}: {json.dumps(runs[v][seed])}", file=sys.stderr, flush=True)
    ref = runs[args.variants[0]][args.seeds[0]]
    base = {}
    for seed in args.seeds:
        b = baselines(data_overrides, int(ref["latent_values_per_clip"]), steps=args.steps, seed=seed, lpips=False)
        base[seed] = {"frame_repeat": {k: b["frame_repeat"][k] for k in ("psnr", "ssim", "cf")},
                      "image_ae": {k: b["image_ae"][k] for k in ("psnr", "ssim", "cf", "train_seconds")},
                      "val_clip": b["data"]["val_clip"]}
        print(f"[proof] baselines seed {seed}: {json.dumps(base[seed])}", file=sys.stderr, flush=True)
    mean = lambda xs: sum(xs) / len(xs)
    summary = {v: {k: mean([runs[v][s][k] for s in args.seeds]) for k in ("psnr", "ssim", "cf")} for v in runs}
    effects = {}
    if "full" in runs:
        for v in runs:
            if v == "full":
                continue
            d = [runs["full"][s]["psnr"] - runs[v][s]["psnr"] for s in args.seeds]
            effects[f"full_minus_{v}_psnr"] = {"per_seed": d, "mean": mean(d),
                                               "same_sign_all_seeds": all(x > 0 for x in d) or all(x < 0 for x in d)}
    beats = {}
    for v in runs:
        beats[v] = {f"above_{b}_all_seeds": all(runs[v][s]["psnr"] > base[s][b]["psnr"] for s in args.seeds)
                    for b in ("frame_repeat", "image_ae")}
    result = {"data": data_overrides, "steps": args.steps, "seeds": args.seeds, "threads": args.threads,
              "runs": runs, "baselines": base, "mean": summary, "effects": effects, "beats_baselines": beats,
              "total_seconds": round(time.time() - t0, 1)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
