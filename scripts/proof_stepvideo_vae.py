"""Step-Video VAE CPU proof (issue 13, card 5; docs/methods/stepvideo_vae.md). Prints JSON.

1. Trains experiment=stepvideo_vae_clips (the full-size code at CPU widths: 16x16 spatial x 8 temporal, 64
   latent channels, dual-path ends; L1 + 1e-6 KL) on the staged clips, with the recipe's optimiser settings
   (Adam, lr, warm-up + cosine, grad-clip 1.0) in a plain loop: the same model forward and objective as
   train.py, without Lightning's per-step overhead.
2. Scores the fixed held-out clip with eval/video_recon.py (PSNR, SSIM, CF from the real latent shapes) against
   the two baselines of scripts/video_baselines.py: the first frame repeated, and the per-frame image AE with as
   many latent values per clip as the model.
3. The shortcut property: the trained model with its four dual-path conv paths zeroed (weights and biases), so
   only the parameter-free shortcut (pixel-unshuffle + channel averaging / channel duplication + pixel-shuffle)
   joins backbone and latent; and (--shortcut-model) a model trained from the start with the conv paths at zero
   and frozen — whether the deep-compression ends are trainable through the shortcut alone.

    .venv/bin/python scripts/proof_stepvideo_vae.py                  # ~12 min on 2 shared cores
    .venv/bin/python scripts/proof_stepvideo_vae.py --quick          # a seconds-long check that it runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proof_common import compose  # noqa: E402
from video_baselines import baselines  # noqa: E402

RECIPE = "experiment=stepvideo_vae_clips"


def clip_batches(dm, seed: int):
    """Endless training batches of the recipe's DataModule, normalised (and cropped) as on the device."""
    g = torch.Generator().manual_seed(seed)
    ds = dm.train_set
    while True:
        idx = torch.randperm(len(ds), generator=g).tolist()
        for i in range(0, len(idx) - dm.batch_size + 1, dm.batch_size):
            batch = ds.__getitems__(idx[i:i + dm.batch_size])
            yield dm.device_batch(batch, torch.device("cpu"), augment=True)


def train(model, objective, batches, steps: int, optim, clip: float = 1.0) -> dict:
    from aeforge.models.base import RunProgress
    from aeforge.modules.optim import warmup_cosine

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    warm = optim.warmup_steps or 0
    losses, t0 = [], time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, warm, steps, optim.lr, optim.min_lr, optim.schedule == "cosine")
        batch = {**next(batches), "progress": RunProgress.of(step, steps, 0)}
        loss = objective(model(batch), batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        model.on_train_step_end(step + 1, steps)
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "train_seconds": time.time() - t0, "loss_first": losses[0],
            "loss_last_10pct": sum(tail) / len(tail)}


def score(model, dm) -> dict:
    from aeforge.eval import Evaluation
    from aeforge.eval.video_recon import VideoReconstruction

    with tempfile.TemporaryDirectory() as tmp:
        ev = VideoReconstruction(tmp, lpips=False, gif_clips=0)
        res = Evaluation({"v": ev}, max_samples=None, batch_size=1)(model, dm, torch.device("cpu"))
    keep = ("psnr", "ssim", "cf", "latent_values_per_clip")
    return {k.split("/", 1)[1]: v for k, v in res.items() if k.split("/", 1)[1] in keep}


def chunk_memory(model, frames: int = 129, size: int = 64, chunks: tuple[int, ...] = (17, 33, 129)) -> dict:
    """Peak memory (MB of live tensors above the start, eval/video_recon.peak_memory_mb) and seconds of encode +
    decode of one long clip at several chunk lengths, and the largest difference to the whole-clip result."""
    from aeforge.eval.video_recon import peak_memory_mb

    x = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    saved, out, ref, got = model.chunk_frames, {"frames": frames, "size": size}, None, {}
    try:
        for c in sorted(chunks, reverse=True):
            model.chunk_frames = c
            def run():
                with torch.no_grad():
                    got["y"] = model.decode(model.moments(x)[0])

            t0 = time.time()
            peak = peak_memory_mb(run, torch.device("cpu"))
            seconds = time.time() - t0
            y = got["y"]
            ref = y if ref is None else ref
            out[f"chunk_{c}"] = {"peak_mb": round(peak, 1), "seconds": round(seconds, 2),
                                 "max_abs_diff_to_whole": float((y - ref).abs().max())}
    finally:
        model.chunk_frames = saved
    return out


def zero_conv_paths(model):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for conv in out.conv_paths():
            conv.conv.weight.zero_()
            conv.conv.bias.zero_()
    return out


def conv_path_names(model) -> list[str]:
    ids = {id(c) for c in model.conv_paths()}
    return [n for n, m in model.named_modules() if id(m) in ids]


def run_model(overrides: list[str], steps: int, seed: int, shortcut_only: bool = False):
    from hydra.utils import instantiate

    from aeforge.train import model_inputs

    cfg = compose([RECIPE, f"seed={seed}", *overrides])
    torch.manual_seed(seed)
    dm = instantiate(cfg.data, seed=seed)
    dm.setup("fit")
    extra = {}
    if shortcut_only:
        probe = instantiate(cfg.model, **model_inputs(cfg.model, dm))
        extra = {"zero_conv_path": True, "freeze": conv_path_names(probe)}
        torch.manual_seed(seed)
    model = instantiate(cfg.model, **model_inputs(cfg.model, dm), **extra)
    objective = instantiate(cfg.objective)
    log = train(model, objective, clip_batches(dm, seed), steps, cfg.optim, cfg.trainer.gradient_clip_val or 1.0)
    return model, dm, cfg, log


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's max_steps)")
    p.add_argument("--baseline-steps", type=int, default=600, help="steps of the per-frame image AE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut-model", action="store_true", help="also train a shortcut-only model")
    p.add_argument("--quick", action="store_true", help="5 steps, 20 baseline steps: a check that it runs")
    p.add_argument("overrides", nargs="*", help="config overrides of the recipe, e.g. data.frames=17")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.baseline_steps = 5, 20
    cfg = compose([RECIPE, *args.overrides])
    steps = args.steps or int(cfg.trainer.max_steps)
    t0 = time.time()
    model, dm, cfg, log = run_model(args.overrides, steps, args.seed)
    out = {"recipe": RECIPE, "overrides": args.overrides, "seed": args.seed,
           "input_shape": list(dm.input_shape), "val_clip": dm.val_clip,
           "threads": torch.get_num_threads()}
    out["stepvideo_vae"] = {**score(model, dm), **log}
    out["conv_paths_zeroed"] = score(zero_conv_paths(model), dm)
    out["long_clip_memory"] = chunk_memory(model, *((17, 32, (9, 17)) if args.quick else ()))
    if args.shortcut_model:
        sc, _, _, sc_log = run_model(args.overrides, steps, args.seed, shortcut_only=True)
        out["shortcut_only_trained"] = {**score(sc, dm), **sc_log}
    data_overrides = [f"data.{k}={v}" for k, v in cfg.data.items()
                      if k in ("frames", "stride", "hop", "resize", "image_size", "val_video", "val_start")]
    base = baselines(data_overrides, int(out["stepvideo_vae"]["latent_values_per_clip"]), args.baseline_steps,
                     args.seed, lpips=False)
    out["frame_repeat"] = {k: base["frame_repeat"][k] for k in ("psnr", "ssim", "cf")}
    out["image_ae"] = {k: base["image_ae"][k] for k in ("psnr", "ssim", "cf", "steps", "train_seconds",
                                                           "latent_layout")}
    fr, ae = out["frame_repeat"]["psnr"], out["image_ae"]["psnr"]
    out["beats_frame_repeat"] = out["stepvideo_vae"]["psnr"] > fr
    out["beats_image_ae"] = out["stepvideo_vae"]["psnr"] > ae
    out["shortcut_beats_frame_repeat"] = out["conv_paths_zeroed"]["psnr"] > fr
    out["total_seconds"] = time.time() - t0
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
