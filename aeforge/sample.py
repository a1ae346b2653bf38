"""Draw samples from a trained generative model (`aeforge-sample`).

    aeforge-sample ckpt=logs/<run>/checkpoints/last.ckpt n=64 guidance=1.5
    aeforge-sample ckpt=... n=100 steps=100 labels=3          # class-conditional: all of class 3
    aeforge-sample ckpt=... n=64 labels=0,1,2,3 seed=1 out=/tmp/samples ema=false
    aeforge-sample ckpt=/elsewhere/x.ckpt model=... data=...   # a checkpoint without its run dir

The run config next to the checkpoint (`<run>/.hydra/config.yaml`) rebuilds the model, exactly as aeforge-eval
does (other `key=value` overrides are applied to it); its weights come from the checkpoint — the EMA weights
when the checkpoint holds an EMA callback's average (`ema=auto`, the default; `ema=false`: the raw weights).
The model must implement the generative contract `sample(n, labels, guidance, steps, generator) -> (n, C, H, W)`
in [-1, 1]. `labels` (class-conditional models, those with `num_classes`): one class for all, a comma list
cycled over the n samples, or `all` (0..K−1 cycled, the default for a conditional model).

Writes `<out>/samples.png` (a grid) and `<out>/samples.npz` (`images`: (n, H, W, C) uint8, `labels`: (n,)
int64, −1 when unconditional; `guidance`, `steps`, `seed`); `out` defaults to `<run>/samples/`. The npz path is
the last line printed."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

USAGE = ("usage: aeforge-sample ckpt=<run>/checkpoints/<name>.ckpt [n=64] [guidance=1.0] [steps=50] [seed=0] "
         "[labels=all|K|k1,k2,..] [batch_size=64] [ema=auto|true|false] [out=<dir>] [device=auto|cpu|cuda] "
         "[config overrides]")
OWN_KEYS = ("ckpt", "n", "guidance", "steps", "seed", "labels", "batch_size", "ema", "out", "device")


def fail(msg: str):
    raise SystemExit(f"sample: {msg}")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    args: dict = {"n": "64", "guidance": "1.0", "steps": "50", "seed": "0", "labels": None, "batch_size": "64",
                  "ema": "auto", "out": None, "device": "auto", "ckpt": None}
    rest = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            args[key] = value
        elif arg in ("-h", "--help"):
            raise SystemExit(USAGE)
        else:
            rest.append(arg)
    if args["ckpt"] is None:
        fail(f"no ckpt= given\n{USAGE}")
    path = Path(args["ckpt"]).expanduser()
    if not path.is_file():
        fail(f"ckpt={args['ckpt']}: no such checkpoint file")
    args["ckpt"] = path.resolve()
    for key, kind in (("n", int), ("steps", int), ("seed", int), ("batch_size", int), ("guidance", float)):
        try:
            args[key] = kind(args[key])
        except ValueError:
            fail(f"{key}={args[key]!r} is not a{'n integer' if kind is int else ' number'}")
    for key in ("n", "steps", "batch_size"):
        if args[key] < 1:
            fail(f"{key}={args[key]} must be >= 1")
    if args["ema"] not in ("auto", "true", "false"):
        fail(f"ema={args['ema']!r}; valid: auto, true, false")
    if args["device"] not in ("auto", "cpu", "cuda"):
        fail(f"device={args['device']!r}; valid: auto, cpu, cuda")
    return args, rest


def resolve_labels(spec: str | None, n: int, num_classes: int | None):
    """The (n,) labels tensor, or None for an unconditional model."""
    import torch

    if not num_classes:
        if spec not in (None, "all"):
            fail(f"labels={spec}: this model is unconditional (it has no num_classes)")
        return None
    if spec in (None, "all"):
        return torch.arange(n) % num_classes
    try:
        classes = [int(c) for c in spec.split(",") if c != ""]
    except ValueError:
        fail(f"labels={spec!r}: give one class, a comma list (0,3,7) or all")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        fail(f"labels={spec!r}: classes must be in [0, {num_classes - 1}]{f', got {bad}' if bad else ''}")
    return torch.tensor(classes).repeat(math.ceil(n / len(classes)))[:n]


def ema_weights(checkpoint: dict) -> dict | None:
    """The EMA callback's averaged parameters (model-relative names), if the checkpoint holds them."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("shadow"), dict):
            return state["shadow"]
    return None


def load_model(ckpt: Path, overrides: list[str], ema: str):
    """The run's model with the checkpoint's weights, in eval mode, and the datamodule it was built for."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from aeforge.checkpoints import load_checkpoint, state_dict_of
    from aeforge.evaluate import build_config
    from aeforge.models.base import model_state_dict
    from aeforge.train import build, model_inputs

    try:
        cfg, _ = build_config(ckpt, "none", overrides)
        datamodule = build(cfg.data, seed=cfg.seed)
        model = build(cfg.model, **model_inputs(cfg.model, datamodule))
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    checkpoint = load_checkpoint(ckpt, what=f"ckpt={ckpt}")
    model.load_state_dict(model_state_dict({"state_dict": state_dict_of(checkpoint, ckpt, f"ckpt={ckpt}")}))
    shadow = ema_weights(checkpoint)
    if ema == "true" and shadow is None:
        fail(f"ema=true: {ckpt} holds no EMA weights (the run had no EMA callback)")
    if shadow is not None and ema != "false":
        params = dict(model.named_parameters())
        missing = sorted(set(shadow) - set(params))
        if missing:
            fail(f"the EMA weights in {ckpt} name parameters this model lacks: {missing[:4]}")
        for k, v in shadow.items():
            params[k].data.copy_(v)
        logging.getLogger(__name__).info("sample: using the EMA weights (ema=false: the raw ones)")
    return model.eval(), datamodule


def draw(model, n: int, labels, guidance: float, steps: int, seed: int, batch_size: int, device):
    """n samples in [-1, 1] on the cpu, drawn in batches from one seeded generator."""
    import torch

    if not hasattr(model, "sample"):
        fail(f"{type(model).__name__} is not a generative model: it has no sample(n, labels, guidance, steps, "
             f"generator)")
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            lab = labels[start:start + m].to(device) if labels is not None else None
            s = model.sample(m, lab, guidance, steps, g).float()
            if s.shape[0] != m or s.ndim != 4:
                fail(f"{type(model).__name__}.sample returned shape {tuple(s.shape)}; the contract is (n, C, H, W)")
            out.append(s.clamp(-1, 1).cpu())
    return torch.cat(out)


def save(samples, labels, out: Path, meta: dict) -> Path:
    import numpy as np
    import torch
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    images = (samples + 1) / 2
    save_image(images, out / "samples.png", nrow=int(math.ceil(math.sqrt(len(images)))), padding=2, pad_value=1.0)
    arr = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    lab = labels.numpy() if labels is not None else np.full(len(arr), -1, dtype=np.int64)
    path = out / "samples.npz"
    np.savez(path, images=arr, labels=lab.astype(np.int64), **{k: np.asarray(v) for k, v in meta.items()})
    return path


def main(argv: list[str] | None = None) -> Path:
    args, overrides = parse_args(sys.argv[1:] if argv is None else list(argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    import torch

    from aeforge.checkpoints import CheckpointError
    from aeforge.evaluate import run_dir_of

    device = torch.device("cuda" if args["device"] == "cuda" or (
        args["device"] == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        model, _ = load_model(args["ckpt"], overrides, args["ema"])
    except CheckpointError as e:
        fail(str(e))
    model.to(device)
    num_classes = getattr(model, "num_classes", None)
    labels = resolve_labels(args["labels"], args["n"], num_classes if isinstance(num_classes, int) else None)
    samples = draw(model, args["n"], labels, args["guidance"], args["steps"], args["seed"], args["batch_size"],
                   device)
    out = Path(args["out"]) if args["out"] else run_dir_of(args["ckpt"]) / "samples"
    path = save(samples, labels, out, {"guidance": args["guidance"], "steps": args["steps"], "seed": args["seed"]})
    print(f"samples: {out / 'samples.png'}")
    print(f"samples: {path}")
    return path


def cli() -> None:
    """The `aeforge-sample` console script (its exit status must not be main()'s returned path)."""
    main()


if __name__ == "__main__":
    main()
