"""Hi-VAE CPU proof (issue 13, card 1; docs/methods/hi_vae.md). Prints JSON.

1. The frozen image VAE: experiment=hi_vae_image_vae_clips (FrameKLVAE, 32 px frames -> 4x8x8), trained here
   and saved as an aeforge run (checkpoint + .hydra/config.yaml) that Hi-VAE loads with image_vae=aeforge:<ckpt>.
2. Stage A (global only) = experiment=hi_vae_clips; stage B = the same with stage=detailed,
   model.freeze=[global_encoder], started from stage A's weights (train.py's ckpt= loader). Control: stage A
   trained on for the same extra steps, so "B beats A" is not just "B trained longer".
3. Held-out clips (data.val_count): PSNR / SSIM of every model by eval/video_recon.py, against the two
   baselines of scripts/video_baselines.py (the first frame repeated; the per-frame image AE with as many latent
   values per clip as stage B). PSNR is also given over the target frames 1..T-1 only: frame repeat copies
   frame 0 exactly, which the evaluator scores 100 dB.
4. Motion transfer: decode B's reference (and B's detailed tokens) with A's global motion u_g; the track of the
   output's edge centroid is correlated with A's track, against controls (A's u_g with its frames shuffled; B's
   own u_g).

Training runs a plain loop over the recipe's optimiser settings (AdamW, lr, warm-up, grad-clip 1.0) on latents
precomputed once per frame (the image VAE is frozen and deterministic), instead of Lightning re-encoding every
batch: the same model forward and objective, ~10x less CPU.

    .venv/bin/python scripts/proof_hi_vae.py                 # ~10 min on 2 shared cores
    .venv/bin/python scripts/proof_hi_vae.py --quick         # a seconds-long check that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proof_common import compose  # noqa: E402
from video_baselines import FrameRepeat, train_image_ae  # noqa: E402

DATA = ["data.val_count=3"]


def log(msg: str) -> None:
    print(f"[proof_hi_vae {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_loop(model, objective, batches, steps: int, optim, clip: float = 1.0, seed: int = 0) -> list[float]:
    """AdamW on the trainable parameters, linear warm-up, constant or cosine after it (modules/optim.py)."""
    from aeforge.modules.optim import warmup_cosine

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    warm = optim.warmup_steps or 0
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = optim.lr * warmup_cosine(step, warm, steps, optim.lr, optim.min_lr, optim.schedule == "cosine")
        batch = next(batches)
        loss = objective(model(batch), batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if hasattr(model, "on_train_step_end"):
            model.on_train_step_end(step + 1, steps)
        losses.append(loss.item())
        if (step + 1) % max(steps // 4, 1) == 0:
            log(f"{type(model).__name__} step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return losses


def frame_batches(dm, batch_size: int, seed: int):
    from video_baselines import training_frames

    frames = training_frames(dm)
    g = torch.Generator().manual_seed(seed)
    while True:
        pick = frames[torch.randint(len(frames), (batch_size,), generator=g)]
        yield {"x": dm.normalize(pick[:, :, None], augment=True)}


def train_image_vae(steps: int, seed: int, out: Path) -> tuple[str, dict]:
    """experiment=hi_vae_image_vae_clips, saved as a run dir (checkpoints/last.ckpt + .hydra/config.yaml)."""
    from hydra.utils import instantiate

    cfg = compose(["experiment=hi_vae_image_vae_clips", f"seed={seed}", *DATA])
    dm = instantiate(cfg.data, seed=seed)
    dm.setup("fit")
    torch.manual_seed(seed)
    model = instantiate(cfg.model, input_shape=dm.input_shape)
    t0 = time.time()
    losses = train_loop(model, instantiate(cfg.objective), frame_batches(dm, cfg.data.batch_size, seed), steps,
                        cfg.optim, seed=seed)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True)}),
                   out / ".hydra" / "config.yaml")
    ckpt = out / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return str(ckpt), {"steps": steps, "seconds": time.time() - t0, "final_loss": sum(losses[-20:]) / 20,
                       "latent_std": model.latent_std.item()}


@torch.no_grad()
def video_latents(model, videos: list[torch.Tensor], dm) -> list[torch.Tensor]:
    """Every frame of each uint8 video (C, T, H, W) through the frozen image VAE once: (T, c, h, w)."""
    out = []
    for v in videos:
        x = dm.normalize(v[None])  # (1, C, T, H, W) in [-1, 1]
        out.append(model.frame_latents({"x": x})[0])
    return out


def clip_batches(dm, lat: list[torch.Tensor], batch_size: int, seed: int):
    ds, g = dm.train_set, torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(ds), (batch_size,), generator=g).tolist()
        z = []
        for i in idx:
            v, start, stride = ds.windows[i]
            z.append(lat[v][start: start + (ds.frames - 1) * stride + 1: stride])
        yield {"x": None, "latents": torch.stack(z)}


def hi_vae_cfg(stage: str, image_vae: str, seed: int, extra: list[str]):
    over = ["experiment=hi_vae_clips", f"stage={stage}", f"model.image_vae=aeforge:{image_vae}", f"seed={seed}",
            *DATA, *extra]
    if stage == "detailed":
        over.append("model.freeze=[global_encoder]")
    return compose(over)


class VAECeiling(torch.nn.Module):
    """Every frame through the frozen image VAE: the best any Hi-VAE on it can do."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def reconstruct(self, batch):
        x = batch["x"]
        f = self.vae.decode(self.vae.encode(x.transpose(1, 2).flatten(0, 1)))
        return f.view(x.shape[0], -1, *f.shape[1:]).transpose(1, 2)


def val_clips(dm) -> torch.Tensor:
    return torch.stack([dm.val_set.clip(i) for i in range(len(dm.val_set))])


@torch.no_grad()
def scores(model, dm, clips_u8: torch.Tensor) -> dict:
    """PSNR/SSIM of the evaluator (all frames) and PSNR of the target frames 1..T-1, on the held-out clips."""
    from aeforge.eval.video_recon import psnr_per_frame, ssim_per_frame

    x = dm.normalize(clips_u8)
    model.eval()
    recon = torch.cat([model.reconstruct({"x": x[i: i + 1]}) for i in range(len(x))]).float()
    a, b = dm.denormalize(recon).clamp(0, 1), dm.denormalize(x)
    psnr, ssim = psnr_per_frame(a, b), ssim_per_frame(a, b)
    out = {"psnr_all_frames": psnr.mean().item(), "psnr_targets": psnr[:, 1:].mean().item(),
           "ssim_all_frames": ssim.mean().item(), "ssim_targets": ssim[:, 1:].mean().item()}
    if hasattr(model, "latents"):
        from aeforge.eval.video_recon import compression_factor, latent_values

        lat = model.latents({"x": x[:1]})
        out["latent_values_per_clip"] = sum(latent_values(lat, 1).values())
        out["cf"] = compression_factor(tuple(x.shape[1:]), lat)
        if "z_ref" in lat:
            out["cf_without_reference"] = compression_factor(tuple(x.shape[1:]), lat, ("z_ref",))
    return out


def edge_track(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) in [0, 1] -> (B, 2·(T-1)): the gradient-magnitude-weighted centroid of each frame,
    minus frame 0's (x then y): where the content moved."""
    g = video.mean(1)  # (B, T, H, W)
    mag = (g[..., 1:, :-1] - g[..., :-1, :-1]).abs() + (g[..., :-1, 1:] - g[..., :-1, :-1]).abs()
    w = mag / mag.sum((-2, -1), keepdim=True).clamp_min(1e-8)
    h, wd = w.shape[-2:]
    ys, xs = torch.arange(h, dtype=w.dtype), torch.arange(wd, dtype=w.dtype)
    cx, cy = (w.sum(-2) * xs).sum(-1), (w.sum(-1) * ys).sum(-1)  # (B, T)
    return torch.cat([cx[:, 1:] - cx[:, :1], cy[:, 1:] - cy[:, :1]], 1)


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


@torch.no_grad()
def motion_transfer(model, dm, lat: list[torch.Tensor], pairs: int, seed: int) -> dict:
    """A = the training clips with the largest edge-centroid motion, B = other clips; decode B's reference (and
    detailed tokens) with A's u_g and correlate the output's track with A's."""
    ds = dm.train_set
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([ds.clip(i) for i in range(len(ds))])
    tracks = edge_track(x.float() / 255)
    moving = tracks.norm(dim=1).argsort(descending=True)[:pairs]
    model.eval()
    rows = {"transfer": [], "shuffled_u_g": [], "own_u_g_of_b": [], "a_reconstructed": []}
    for a_idx in moving.tolist():
        b_idx = int(torch.randint(len(ds), (1,), generator=g))
        while ds.windows[b_idx][0] == ds.windows[a_idx][0]:  # B from another video than A
            b_idx = int(torch.randint(len(ds), (1,), generator=g))
        la, lb = (model.latents({"x": dm.normalize(ds.clip(i)[None])}) for i in (a_idx, b_idx))
        perm = torch.randperm(la["u_g"].shape[1], generator=g)
        outs = {"transfer": {**lb, "u_g": la["u_g"]}, "shuffled_u_g": {**lb, "u_g": la["u_g"][:, perm]},
                "own_u_g_of_b": lb, "a_reconstructed": la}
        track_a = tracks[a_idx: a_idx + 1]
        for k, latents in outs.items():
            video = dm.denormalize(model.decode_latents(latents)).clamp(0, 1)
            rows[k].append(corr(edge_track(video), track_a).item())
    return {f"corr_with_a_track/{k}": sum(v) / len(v) for k, v in rows.items()} | {"pairs": len(moving)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--steps-a", type=int, default=600)
    p.add_argument("--steps-b", type=int, default=400)
    p.add_argument("--baseline-steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.vae_steps = args.steps_a = args.steps_b = args.baseline_steps = 3
        args.pairs = 1
    from hydra.utils import instantiate

    from aeforge.train import init_from_checkpoint

    t_start = time.time()
    result: dict = {"seed": args.seed, "steps": vars(args), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="hi_vae_proof_") as tmp:
        tmp = Path(tmp)
        vae_ckpt, result["image_vae"] = train_image_vae(args.vae_steps, args.seed, tmp / "image_vae")
        cfg_a = hi_vae_cfg("global", vae_ckpt, args.seed, [])
        dm = instantiate(cfg_a.data, seed=args.seed)
        dm.setup("fit")
        torch.manual_seed(args.seed)
        model_a = instantiate(cfg_a.model, input_shape=dm.input_shape)
        lat = video_latents(model_a, dm.train_set.videos, dm)
        objective = instantiate(cfg_a.objective)
        bs = cfg_a.data.batch_size
        t0 = time.time()
        loss_a = train_loop(model_a, objective, clip_batches(dm, lat, bs, args.seed), args.steps_a, cfg_a.optim,
                            seed=args.seed)
        result["train_seconds_a"] = time.time() - t0
        state_a = tmp / "stage_a.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in model_a.state_dict().items()}}, state_a)
        # stage B from stage A (the global encoder frozen by name) and the control: stage A trained on as long
        cfg_b = hi_vae_cfg("detailed", vae_ckpt, args.seed, [])
        torch.manual_seed(args.seed)
        model_b = instantiate(cfg_b.model, input_shape=dm.input_shape)
        result["stage_b_init"] = init_from_checkpoint(model_b, str(state_a))
        enc_before = {k: v.clone() for k, v in model_b.global_encoder.state_dict().items()}
        t0 = time.time()
        loss_b = train_loop(model_b, objective, clip_batches(dm, lat, bs, args.seed + 1), args.steps_b,
                            cfg_b.optim, seed=args.seed + 1)
        result["train_seconds_b"] = time.time() - t0
        result["stage_b_global_encoder_bit_identical"] = all(
            torch.equal(v, enc_before[k]) for k, v in model_b.global_encoder.state_dict().items())
        model_a2 = instantiate(cfg_a.model, input_shape=dm.input_shape)
        init_from_checkpoint(model_a2, str(state_a))
        loss_a2 = train_loop(model_a2, objective, clip_batches(dm, lat, bs, args.seed + 1), args.steps_b,
                             cfg_a.optim, seed=args.seed + 1)
        tail = lambda v: sum(v[-50:]) / len(v[-50:])  # noqa: E731
        result["final_velocity_loss"] = {"stage_a": tail(loss_a), "stage_b": tail(loss_b),
                                         "stage_a_continued": tail(loss_a2)}
        clips = val_clips(dm)
        result["held_out"] = {"clips": dm.val_clip, "input_shape": list(dm.input_shape)}
        ev = {"stage_a": scores(model_a, dm, clips), "stage_a_continued": scores(model_a2, dm, clips),
              "stage_b": scores(model_b, dm, clips), "frame_repeat": scores(FrameRepeat(), dm, clips),
              "image_vae_ceiling": scores(VAECeiling(model_b.image_vae), dm, clips)}
        per_frame = ev["stage_b"]["latent_values_per_clip"] // dm.frames
        image_ae, secs = train_image_ae(dm, per_frame, args.baseline_steps, args.seed)
        ev["image_ae_same_latent"] = scores(image_ae, dm, clips) | {"train_seconds": secs, "steps": args.baseline_steps}
        ev["image_ae_same_latent"]["latent_values_per_clip"] = per_frame * dm.frames
        result["eval"] = ev
        result["motion_transfer_stage_b"] = motion_transfer(model_b, dm, lat, args.pairs, args.seed)
        result["motion_transfer_stage_a"] = motion_transfer(model_a, dm, lat, args.pairs, args.seed)
    result["total_seconds"] = time.time() - t_start
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
