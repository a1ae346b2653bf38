"""Steps/s of the full `train.py` path vs a bare PyTorch loop of the same model, data and optimiser (CPU).

    python scripts/bench_overhead.py [--steps 400] [--batch 128] [--threads 2]

Prints JSON. Both loops train the default MLP autoencoder on the shipped MNIST subset (uint8 batches
normalised per step, AdamW, same batch size) in one process; the aeforge path runs with its default
callbacks and CSV logger ("full") and with neither ("lean"). Goal: ratio bare/aeforge <= 1.10."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def bare_loop(steps: int, batch: int, warmup: int) -> float:
    from aeforge.cli import ASSETS
    from aeforge.data.images import load_npz
    from aeforge.models.ae import MLPAutoencoder

    torch.manual_seed(0)
    x_all = torch.from_numpy(load_npz(ASSETS / "mnist_subset.npz", ("x",))["x"]).unsqueeze(1)
    model = MLPAutoencoder((1, 28, 28), [512, 256], 32, "gelu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mean, std = 0.1307, 0.3081
    n_batches = len(x_all) // batch
    t0, done = None, 0
    while done < steps + warmup:
        perm = torch.randperm(len(x_all))
        for i in range(n_batches):
            if done == warmup:
                t0 = time.perf_counter()
            x = (x_all[perm[i * batch : (i + 1) * batch]].float() / 255 - mean) / std
            loss = (model({"x": x})["recon"] - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps + warmup:
                break
    return steps / (time.perf_counter() - t0)


def aeforge_loop(steps: int, batch: int, warmup: int, lean: bool) -> float:
    from omegaconf import open_dict

    from aeforge.compose import compose_config
    from aeforge.train import run

    out = tempfile.mkdtemp(prefix="aeforge-bench-")
    overrides = [f"data.batch_size={batch}", f"trainer.max_steps={steps + warmup}", "trainer.max_epochs=-1",
                 "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "trainer.accelerator=cpu", "eval=none", "optimized_metric=null"]
    overrides += ["callbacks=none", "logger=none"] if lean else ["callbacks.model_checkpoint.monitor=null"]
    cfg = compose_config(overrides, output_dir=out, task_name="bench")
    with open_dict(cfg):
        cfg.paths.root_dir = out
        cfg.callbacks = dict(cfg.callbacks or {})
        cfg.callbacks["timer"] = {"_target_": "aeforge.callbacks.StepTimer", "warmup": warmup}
    run(cfg)
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    return json.loads((Path(out) / "metrics.json").read_text())["train/steps_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bare = bare_loop(args.steps, args.batch, args.warmup)
    full = aeforge_loop(args.steps, args.batch, args.warmup, lean=False)
    lean = aeforge_loop(args.steps, args.batch, args.warmup, lean=True)
    print(json.dumps({
        "model": "MLPAutoencoder 784-512-256-32 (1.08M params)", "batch": args.batch, "steps": args.steps,
        "threads": args.threads, "bare_steps_per_s": round(bare, 2),
        "aeforge_full_steps_per_s": round(full, 2), "aeforge_lean_steps_per_s": round(lean, 2),
        "ratio_bare_over_full": round(bare / full, 3), "ratio_bare_over_lean": round(bare / lean, 3),
        "goal_ratio": 1.10,
    }, indent=2))


if __name__ == "__main__":
    main()
