"""The two baselines every video method's CPU proof beats (issue 13), measured on the held-out clip by the
same evaluator as the methods (aeforge/eval/video_recon.py). Prints JSON.

  frame_repeat  the clip's first frame shown for every frame (latent: that frame; CF = T)
  image_ae      a per-frame convolutional image AE trained here on single frames of the training clips, with
                as many latent values per clip as the video method it is compared with (--latent-values, per
                clip: the video model's `latent_values_per_clip` from eval=video_recon), i.e. the same CF

    .venv/bin/python scripts/video_baselines.py --latent-values 544 data.frames=17 data.resize=32 data.image_size=32
    .venv/bin/python scripts/video_baselines.py --quick            # seconds: 40 steps, a smoke check

Data overrides are those of data=video_clips (a proof passes its recipe's). From a proof:
`from video_baselines import baselines; baselines(data_overrides, latent_values, steps, seed)`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proof_common import compose  # noqa: E402


class FrameRepeat(nn.Module):
    """The first frame, repeated: what a model that knows nothing of motion reconstructs."""

    modality = "video"

    def latents(self, batch) -> dict[str, torch.Tensor]:
        return {"first_frame": batch["x"][:, :, 0]}

    def reconstruct(self, batch) -> torch.Tensor:  # no decode_latents: the latent lacks the frame count
        x = batch["x"]
        return x[:, :, :1].expand_as(x).clone()


def latent_layout(image_size: int, per_frame: int) -> tuple[int, int]:
    """(grid side g, channels c) of a conv latent holding `per_frame` values (c = per_frame / g²), the finest
    grid among image_size / 4, / 8, / 16 that divides it; (g, 0) means a dense latent of per_frame values
    read from a g x g feature map (g = image_size / 8) when no grid divides it."""
    for f in (4, 8, 16):
        g = image_size // f
        if g >= 1 and image_size % f == 0 and per_frame % (g * g) == 0:
            return g, per_frame // (g * g)
    return max(image_size // 8, 1), 0


class PerFrameAE(nn.Module):
    """Conv encoder/decoder applied to every frame on its own (stride-2 convs, SiLU) with `per_frame` latent
    values a frame: a spatial latent when a grid divides it, else a dense vector (latent_layout)."""

    modality = "video"

    def __init__(self, image_size: int, per_frame: int, width: int = 64, channels: int = 3):
        super().__init__()
        if per_frame < 1:
            raise ValueError(f"per-frame latent size {per_frame} < 1: raise --latent-values")
        self.g, self.c = latent_layout(image_size, per_frame)
        self.per_frame, self.width = per_frame, width
        downs = int(math.log2(image_size // self.g))
        enc = [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()]
        dec = []
        for _ in range(downs):
            enc += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                    nn.SiLU()]
            dec += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                    nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        cells = width * self.g * self.g
        self.to_z = nn.Conv2d(width, self.c, 1) if self.c else nn.Sequential(nn.Flatten(), nn.Linear(cells, per_frame))
        self.from_z = nn.Conv2d(self.c, width, 1) if self.c else nn.Linear(per_frame, cells)
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec, nn.Conv2d(width, channels, 3, padding=1))

    def encode_frames(self, f: torch.Tensor) -> torch.Tensor:
        return self.to_z(self.encoder(f))

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_z(z)
        return self.decoder(h if self.c else h.view(-1, self.width, self.g, self.g))

    def latents(self, batch) -> dict[str, torch.Tensor]:
        x = batch["x"]
        b, c, t, h, w = x.shape
        z = self.encode_frames(x.transpose(1, 2).reshape(b * t, c, h, w))
        return {"z": z.view(b, t, *z.shape[1:])}

    def decode_latents(self, latents) -> torch.Tensor:
        z = latents["z"]
        b, t = z.shape[:2]
        f = self.decode_frames(z.flatten(0, 1))
        return f.view(b, t, *f.shape[1:]).transpose(1, 2)

    def reconstruct(self, batch) -> torch.Tensor:
        return self.decode_latents(self.latents(batch))


def training_frames(dm) -> torch.Tensor:
    """Every frame of the training videos, uint8 (N, C, H, W)."""
    return torch.cat([v.transpose(0, 1) for v in dm.train_set.videos])


def train_image_ae(dm, per_frame: int, steps: int, seed: int, batch_size: int = 32, lr: float = 2e-3,
                   width: int = 32) -> tuple[PerFrameAE, float]:
    """MSE on random frames of the training videos (random crops to image_size, as the video recipes see)."""
    torch.manual_seed(seed)
    model = PerFrameAE(dm.image_size, per_frame, width)
    frames = training_frames(dm)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(steps):
        pick = frames[torch.randint(len(frames), (batch_size,), generator=g)]
        x = dm.normalize(pick[:, :, None], augment=True)[:, :, 0]  # a 1-frame clip: the same crop and scaling
        loss = F.mse_loss(model.decode_frames(model.encode_frames(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), time.time() - t0


def evaluate(model, dm, lpips: bool) -> dict[str, float]:
    from aeforge.eval import Evaluation
    from aeforge.eval.video_recon import VideoReconstruction

    with tempfile.TemporaryDirectory() as tmp:
        ev = VideoReconstruction(tmp, lpips=lpips, gif_clips=0)
        return Evaluation({"video_recon": ev}, max_samples=None, batch_size=1)(model, dm, torch.device("cpu"))


def lpips_available() -> bool:
    try:
        from aeforge.objectives.perceptual import lpips_distance  # noqa: F401
    except ImportError:
        return False
    return True


def baselines(data_overrides: list[str], latent_values: int, steps: int = 1500, seed: int = 0,
              lpips: bool | None = None) -> dict:
    from hydra.utils import instantiate

    cfg = compose(["data=video_clips", *data_overrides, f"seed={seed}"])
    dm = instantiate(cfg.data, seed=seed)
    lpips = lpips_available() if lpips is None else lpips
    frames = dm.frames
    per_frame = latent_values // frames
    out = {"data": {"overrides": data_overrides, "val_clip": dm.val_clip, "input_shape": list(dm.input_shape),
                    "train_clips": len(dm.train_set)}, "seed": seed}
    out["frame_repeat"] = {k.split("/", 1)[1]: v for k, v in evaluate(FrameRepeat(), dm, lpips).items()}
    model, seconds = train_image_ae(dm, per_frame, steps, seed)
    res = {k.split("/", 1)[1]: v for k, v in evaluate(model, dm, lpips).items()}
    res.update(steps=steps, train_seconds=seconds, latent_values_per_frame=per_frame,
               latent_layout=f"{model.c}x{model.g}x{model.g}" if model.c else f"dense {per_frame}")
    out["image_ae"] = res
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent-values", type=int, default=None,
                   help="latent values per clip of the video model compared with (default: CF 48 of the input)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--quick", action="store_true", help="40 steps on 9-frame 32 px clips: a check that it runs")
    args, overrides = p.parse_known_args(argv)
    if args.quick:
        overrides = ["data.frames=9", "data.resize=32", "data.image_size=32", *overrides]
        args.steps = 40
    probe = compose(["data=video_clips", *overrides])
    shape = (3, probe.data.frames, probe.data.image_size, probe.data.image_size)
    latent_values = args.latent_values or math.prod(shape) // 48
    result = baselines(overrides, latent_values, args.steps, args.seed, lpips=False if args.no_lpips else None)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
