"""Video reconstruction quality, compression and cost on the held-out clip(s) (`eval=video_recon`).

Reads a video model's contract: `reconstruct(batch) -> (B, C, T, H, W)` in the data's [-1, 1] space and
`latents(batch) -> dict[str, Tensor]`, every tensor (batch first) the decoder needs to rebuild the clip; an
optional `decode_latents(latents) -> (B, C, T, H, W)` lets decoding be timed on its own.

- psnr: per clip, from the mean squared error over all its frames ([0, 1] pixels), averaged over clips — not
  the mean of per-frame PSNRs, which a frame reconstructed exactly (the reference frame a frame-repeat or a
  conditional decoder copies) would make infinite; ssim, lpips: per frame, averaged over all frames of all
  clips; per-frame curves of all three in `video_recon.json` (a frame's PSNR capped at 100 dB). LPIPS comes
  from objectives/perceptual.py (`lpips_distance`); with no backbone weights (offline) the network is random
  and the key says so: `lpips_random_net`.
- cf: the compression factor from the real shapes, (C·T·H·W of the input) / (values of every latent tensor, per
  clip) — the card's CF = 3·F·H·W / numel(latents). Every tensor the decoder needs counts, the reference-frame
  latent of a conditional decoder too; `reference_keys` names such tensors, and `cf_without_reference` is the
  ratio without them (how Hi-VAE's paper may count: the card leaves it open).
- encode/decode frames per second and latent values per second; peak memory of encode and decode of the first
  batch (CUDA: the allocator's peak above the baseline; CPU: the peak of live tensor memory from the autograd
  profiler's allocation records; without decode_latents, "decode" memory is that of the whole reconstruct).
- `video_recon.gif`: input | reconstruction side by side, one row per clip.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from aeforge.eval.skips import skipped


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B·T, C, H, W)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def psnr_per_frame(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of every frame of two [0, 1] videos (B, C, T, H, W) -> (B, T); identical frames cap at 100."""
    mse = (a.float() - b.float()).pow(2).mean(dim=(1, 3, 4))
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def psnr_per_clip(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each clip's pooled squared error over all its frames: (B, C, T, H, W) -> (B,)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def ssim_per_frame(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (11x11 Gaussian window) of every frame of two [0, 1] videos -> (B, T)."""
    fa, fb = frames_of(a.float()), frames_of(b.float())
    if fa.shape[-1] < 11 or fa.shape[-2] < 11:  # the window needs 11 pixels a side
        fa, fb = (F.interpolate(t, size=(max(11, t.shape[-2]), max(11, t.shape[-1])), mode="nearest")
                  for t in (fa, fb))
    s = structural_similarity_index_measure(fa, fb, data_range=1.0, reduction="none")
    return s.view(a.shape[0], a.shape[2])


def latent_values(latents: dict[str, torch.Tensor], batch_size: int) -> dict[str, int]:
    """Values per clip of each latent tensor (batch first)."""
    out = {}
    for k, v in latents.items():
        if not torch.is_tensor(v) or v.ndim == 0 or v.shape[0] != batch_size:
            raise ValueError(f"latents()[{k!r}] must be a tensor with the batch ({batch_size}) first, got "
                             f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        out[k] = v[0].numel()
    return out


def compression_factor(input_shape: tuple[int, ...], latents: dict[str, torch.Tensor],
                       exclude: tuple[str, ...] = ()) -> float:
    """C·T·H·W of one input clip over the latent values per clip of every tensor not in `exclude`."""
    values = latent_values(latents, next(iter(latents.values())).shape[0])
    kept = sum(n for k, n in values.items() if k not in exclude)
    if kept == 0:
        raise ValueError(f"no latent values left after excluding {list(exclude)} from {sorted(values)}")
    return float(np.prod(input_shape)) / kept


def side_by_side(x: torch.Tensor, recon: torch.Tensor, gap: int = 2) -> np.ndarray:
    """[0, 1] videos (B, C, T, H, W) -> uint8 frames (T, B·(H+gap), 2·W+gap, 3): input left, reconstruction right."""
    b, c, t, h, w = x.shape
    canvas = torch.ones(t, b * (h + gap) - gap, 2 * w + gap, 3)
    for i in range(b):
        for j, v in enumerate((x[i], recon[i])):
            v = v.float().cpu().permute(1, 2, 3, 0)  # T, H, W, C
            canvas[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = (
                v if c == 3 else v[..., :1].expand(-1, -1, -1, 3))
    return (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_gif(path: str | Path, frames: np.ndarray, fps: float, scale: int = 1) -> Path:
    """uint8 frames (T, H, W, 3) as a looping GIF (PIL)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0)
    return path


@contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints start/stop lines there on every use."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory (MB) that `fn()` allocates above what was in use before it. CUDA: the allocator's peak.
    CPU (no allocator statistics): the running sum, in time order, of the allocations and frees the autograd
    profiler records for every op — the peak of live tensor memory, not counting the allocator's caching."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.autograd.profiler import profile

    with _quiet_stderr(), profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.function_events, key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def timed(fn, device: torch.device):
    """(fn(), seconds) with the device synchronised on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


class VideoReconstruction:
    """See the module docstring. lpips_net: "alex" (the LPIPS paper's metric network) or "vgg";
    lpips_weights: the backbone's weights file (null: random backbone, reported as lpips_random_net);
    reference_keys: latents that are the reference frame's (for cf_without_reference); gif_clips: clips in
    the GIF (0: none); fps: the GIF's frame rate; warmup: untimed passes before timing (CUDA kernels, caches)."""

    def __init__(self, out_dir: str, lpips: bool = True, lpips_net: str = "alex", lpips_weights: str | None = None,
                 reference_keys: list[str] | None = None, gif_clips: int = 4, gif_scale: int = 2, fps: float = 8.0,
                 warmup: int = 1):
        if lpips_net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"eval.evaluators.video_recon.lpips_net={lpips_net!r}; valid: ['alex', 'vgg', "
                             f"'squeeze']")
        if lpips_weights is not None and not Path(lpips_weights).is_file():
            raise ValueError(f"eval.evaluators.video_recon.lpips_weights={lpips_weights!r}: no such file (a "
                             f"torchvision {lpips_net} state_dict)")
        self.out_dir, self.lpips, self.lpips_net, self.lpips_weights = Path(out_dir), lpips, lpips_net, lpips_weights
        self.reference_keys = tuple(reference_keys or ())
        self.gif_clips, self.gif_scale, self.fps, self.warmup = gif_clips, gif_scale, fps, warmup
        self._net = None  # the LPIPS network, built at first use

    def lpips_per_frame(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS of every frame of two [-1, 1] videos -> (B, T); frames under 32 px a side are upsampled
        (bilinear) to 32 first, since AlexNet's strided convs and pools need that much."""
        from aeforge.objectives.perceptual import build_lpips, lpips_distance

        if self._net is None:
            self._net = build_lpips(self.lpips_net, self.lpips_weights).to(a.device)
        fa, fb = frames_of(a), frames_of(b)
        if min(fa.shape[-2:]) < 32:
            fa, fb = (F.interpolate(t, size=(max(32, t.shape[-2]), max(32, t.shape[-1])), mode="bilinear",
                                    align_corners=False) for t in (fa, fb))
        return lpips_distance(fa, fb, self._net).reshape(a.shape[0], a.shape[2])

    @torch.no_grad()
    def __call__(self, ctx) -> dict[str, float]:
        model, name = ctx.model, type(self).__name__
        missing = [m for m in ("reconstruct", "latents") if not hasattr(model, m)]
        if missing:
            return skipped(name, f"{type(model).__name__} lacks {missing} (the video model contract)")
        curves: dict[str, list] = {"psnr": [], "ssim": [], "lpips": []}
        clip_psnr = []
        cf = cf_ref = None
        t_enc = t_dec = 0.0
        frames = values = clips = 0
        enc_mem = dec_mem = 0.0
        by_difference = not hasattr(model, "decode_latents")
        gif_x, gif_r = [], []
        for i, batch in enumerate(ctx.batches("val", "video reconstruction")):
            x = batch["x"]
            if x.ndim != 5:
                raise ValueError(f"video_recon needs (B, C, T, H, W) clips, got {tuple(x.shape)}")
            if i == 0:
                for _ in range(self.warmup):
                    model.reconstruct(batch)
            latents, dt = timed(partial(model.latents, batch), ctx.device)
            t_enc += dt
            if by_difference:
                recon, dt_all = timed(partial(model.reconstruct, batch), ctx.device)
                t_dec += max(dt_all - dt, 0.0)
            else:
                recon, dt = timed(partial(model.decode_latents, latents), ctx.device)
                t_dec += dt
            if i == 0:  # memory in a pass of its own: the CPU profiler slows the ops it records
                enc_mem = peak_memory_mb(partial(model.latents, batch), ctx.device)
                dec_mem = peak_memory_mb(partial(model.reconstruct, batch) if by_difference else
                                         partial(model.decode_latents, latents), ctx.device)
            recon = recon.float()
            if recon.shape != x.shape:
                raise ValueError(f"{type(model).__name__}.reconstruct gave {tuple(recon.shape)} for a clip of "
                                 f"{tuple(x.shape)}")
            per_clip = latent_values(latents, x.shape[0])
            if cf is None:
                cf = compression_factor(tuple(x.shape[1:]), latents)
                unknown = [k for k in self.reference_keys if k not in per_clip]
                if unknown:
                    raise ValueError(f"eval.evaluators.video_recon.reference_keys {unknown} are not latents of "
                                     f"{type(model).__name__}; it emits {sorted(per_clip)}")
                if self.reference_keys:
                    cf_ref = compression_factor(tuple(x.shape[1:]), latents, self.reference_keys)
            frames, clips = frames + x.shape[0] * x.shape[2], clips + x.shape[0]
            values += sum(per_clip.values()) * x.shape[0]
            a, b = ctx.datamodule.denormalize(recon), ctx.datamodule.denormalize(x)
            curves["psnr"].append(psnr_per_frame(a, b).cpu())
            clip_psnr.append(psnr_per_clip(a, b).cpu())
            curves["ssim"].append(ssim_per_frame(a, b).cpu())
            if self.lpips:
                curves["lpips"].append(self.lpips_per_frame(recon.clamp(-1, 1), x).cpu())
            if sum(len(v) for v in gif_x) < self.gif_clips:
                gif_x.append(b[: self.gif_clips].cpu())
                gif_r.append(a[: self.gif_clips].cpu())
        if cf is None:
            return skipped(name, "the val split has no clips")
        out = {k: torch.cat(v).mean().item() for k, v in curves.items() if v and k != "psnr"}
        out["psnr"] = torch.cat(clip_psnr).mean().item()
        if "lpips" in out and self.lpips_weights is None:
            out["lpips_random_net"] = out.pop("lpips")
        elif not self.lpips:
            out.update(skipped(name, "eval.evaluators.video_recon.lpips=false", "lpips"))
        out.update(cf=cf, latent_values_per_clip=values / clips, clips=clips,
                   encode_frames_per_s=frames / max(t_enc, 1e-9), decode_frames_per_s=frames / max(t_dec, 1e-9),
                   encode_latent_values_per_s=values / max(t_enc, 1e-9), encode_peak_mem_mb=enc_mem,
                   decode_peak_mem_mb=dec_mem, decode_timed_by_difference=float(by_difference))
        if cf_ref is not None:
            out["cf_without_reference"] = cf_ref
        self.out_dir.mkdir(parents=True, exist_ok=True)
        per_frame = {k: torch.cat(v).mean(0).tolist() for k, v in curves.items() if v}
        (self.out_dir / "video_recon.json").write_text(json.dumps({"per_frame": per_frame, **out}, indent=2))
        if gif_x and self.gif_clips > 0:
            frames_u8 = side_by_side(torch.cat(gif_x)[: self.gif_clips], torch.cat(gif_r)[: self.gif_clips])
            write_gif(self.out_dir / "video_recon.gif", frames_u8, self.fps, self.gif_scale)
        return out
