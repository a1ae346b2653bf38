"""Hi-VAE: video autoencoding as conditional generation with global and detailed motion (Liu et al. 2025;
card 1 of /work/shared/methods/vae_video_generative.md; the reference code calls global motion "camera" and
detailed motion "object").

A clip of T frames: frame 0 is the reference, frames 1..T-1 the F = T - 1 targets. A frozen per-frame image VAE
(targets/image_vae.py) maps frames to latents z. The global-motion encoder reads the 3-D low-pass of
[z_ref repeated F times ; z_targets] (Gaussian, d_s = d_t = 0.6), optionally conv-downsampled ÷4, and emits u_g
(F × S positions × c_g) from learnable temporal queries per location; the detailed-motion encoder reads every
frame (the reference too; optionally high-passed) and emits n_d tokens × c_d per frame (u_d). A rectified-flow
DiT decoder regenerates the target latents from noise given [z_ref ‖ z_t], u_g and u_d; the image VAE decodes
them. Training loss: velocity MSE only (objectives/flow.py VelocityLoss; no perceptual or GAN term, as the
reference). Stages: `stage=global` trains the global encoder + decoder; `stage=detailed` adds the detailed
encoder and the decoder's detailed branch, started from stage A with `ckpt=` and the global encoder frozen by
name (`model.freeze=[global_encoder]`, aeforge/nn/freeze.py).

Flow convention (nn/flow.py): x_t = (1 - t)·z + t·ε, t = 0 data, v = ε - z; the reference's t = 1 is data, the
same path reversed. t is drawn per clip and shared by its frames (the reference's `spatial` decoder).

`FrameKLVAE` is the offline stand-in for SD-VAE: the same diffusers AutoencoderKL, small, trained per frame by
aeforge on the staged clips (`experiment=hi_vae_image_vae_clips`); `FrozenImageVAE(source=aeforge:<ckpt>)`
loads it."""

from __future__ import annotations

import torch
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn.flow import euler_sample, interpolate, sample_t, velocity_target
from aeforge.nn.freeze import FreezeSchedule
from aeforge.nn.freeze import freeze as freeze_names
from aeforge.nn.query_transformer import (
    FlowDiTDecoder,
    PerFrameQueryEncoder,
    TemporalQueryEncoder,
    frequency_filter_2d,
    frequency_filter_3d,
)
from aeforge.targets.image_vae import FrozenImageVAE, build_autoencoder_kl

STAGES = ("global", "detailed")
DETAIL_FILTERS = ("high", "none")
T_SCHEDULES = ("uniform", "logit_normal")


def _frames_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, C, T, H, W) <-> (B, T, C, H, W)


class GlobalMotionEncoder(nn.Module):
    """The global branch after the low-pass: the reference's ÷4 down-sampler (conv c→4c k3 s2, conv 4c→c k3,
    max-pool 2; optional) and the per-location temporal query encoder. One module, so that freezing
    `global_encoder` freezes the whole branch."""

    def __init__(self, channels: int, downsample: bool, encoder_args: dict):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, 2, 1),
                                  nn.Conv2d(4 * channels, channels, 3, 1, 1), nn.MaxPool2d(2)) if downsample else None
        self.encoder = TemporalQueryEncoder(channels, **encoder_args)

    @property
    def output(self) -> str:
        return self.encoder.output

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            b, f = low.shape[:2]
            low = self.down(low.flatten(0, 1))
            low = low.view(b, f, *low.shape[1:])
        return self.encoder(low)


class HiVAE(AutoencoderModel):
    """input_shape (C, T, H, W), T = 1 reference + F targets. `image_vae`: the frozen image VAE's source
    (targets/image_vae.py: diffusers:<folder> | aeforge:<checkpoint> | random, whose architecture the
    image_vae_channels / _latent_channels / _layers_per_block give; SD-VAE's by default). Names for
    `freeze`: global_encoder, detail_encoder (stage detailed), decoder, and dotted paths below them.

    The detailed branch's high-pass is per frame in space (d = highpass_d): the reference code's 3-D filter
    over [ref ; targets] would make the reference frame's tokens depend on the targets, so the decoder could
    not rebuild them from z_ref alone."""

    modality = "video"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        image_vae: str = "random",
        image_vae_scaling_factor: float | None = None,
        image_vae_sample: bool = False,
        image_vae_channels: list[int] = (128, 256, 512, 512),
        image_vae_latent_channels: int = 4,
        image_vae_layers_per_block: int = 2,
        stage: str = "global",
        freeze: list[str] = (),
        freeze_schedule: dict | None = None,
        global_queries: int = 8,
        global_channels: int = 8,
        global_output: str = "frames",
        global_embed_dim: int = 512,
        global_num_heads: int = 8,
        global_depth: int = 8,
        global_patch_size: int = 2,
        global_downsample: bool = True,
        lowpass_d_s: float = 0.6,
        lowpass_d_t: float = 0.6,
        global_mask_ratio: float = 0.0,
        detail_tokens: int = 8,
        detail_channels: int = 16,
        detail_embed_dim: int = 512,
        detail_num_heads: int = 8,
        detail_depth: int = 8,
        detail_patch_size: int = 2,
        detail_filter: str = "high",
        highpass_d: float = 0.5,
        detail_mask_ratio: float = 0.0,
        decoder_embed_dim: int = 1024,
        decoder_num_heads: int = 16,
        decoder_depth: int = 12,
        decoder_patch_size: int = 2,
        time_dim: int = 512,
        t_schedule: str = "uniform",
        sample_steps: int = 4,
        sample_seed: int = 0,
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"model.stage={stage!r}; valid: {list(STAGES)}")
        if detail_filter not in DETAIL_FILTERS:
            raise ValueError(f"model.detail_filter={detail_filter!r}; valid: {list(DETAIL_FILTERS)}")
        for name, r in (("global_mask_ratio", global_mask_ratio), ("detail_mask_ratio", detail_mask_ratio)):
            if not 0 <= r < 1:
                raise ValueError(f"model.{name}={r} must be in [0, 1)")
        c, t, h, w = input_shape
        if t < 2:
            raise ValueError(f"Hi-VAE needs clips of >= 2 frames (1 reference + targets), got {input_shape}")
        if t_schedule not in T_SCHEDULES:
            raise ValueError(f"model.t_schedule={t_schedule!r}; valid: {list(T_SCHEDULES)}")
        self.input_shape, self.stage, self.frames = tuple(input_shape), stage, t - 1
        self.image_vae = image_vae = FrozenImageVAE(
            image_vae, image_vae_scaling_factor, image_vae_sample, block_out_channels=list(image_vae_channels),
            latent_channels=image_vae_latent_channels, layers_per_block=image_vae_layers_per_block,
            norm_num_groups=min(32, *image_vae_channels))
        zc, zh, zw = image_vae.latent_shape(h, w)
        self.latent_shape = (zc, zh, zw)
        self.lowpass = (lowpass_d_s, lowpass_d_t)
        self.detail_filter, self.highpass_d = detail_filter, highpass_d
        self.t_schedule, self.sample_steps, self.sample_seed = t_schedule, sample_steps, sample_seed

        gh, gw = (zh // 4, zw // 4) if global_downsample else (zh, zw)
        for what, size, p in (("global", (gh, gw), global_patch_size), ("detail", (zh, zw), detail_patch_size),
                              ("decoder", (zh, zw), decoder_patch_size)):
            if min(size) < p or size[0] % p or size[1] % p:
                raise ValueError(f"model.{what}_patch_size={p} does not tile its {size[0]}x{size[1]} latent grid "
                                 f"(frames {h}x{w}, image VAE ÷{image_vae.downsample}"
                                 f"{', global ÷4 down-sampler' if what == 'global' and global_downsample else ''})")
        self.global_encoder = GlobalMotionEncoder(zc, global_downsample, dict(
            grid=(gh, gw), frames=self.frames, patch_size=global_patch_size, width=global_embed_dim,
            heads=global_num_heads, depth=global_depth, num_queries=global_queries, out_channels=global_channels,
            output=global_output, mask_ratio=global_mask_ratio))
        detailed = stage == "detailed"
        self.detail_encoder = PerFrameQueryEncoder(
            zc, (zh, zw), detail_patch_size, detail_embed_dim, detail_num_heads, detail_depth, detail_tokens,
            detail_channels, detail_mask_ratio) if detailed else None
        self.decoder = FlowDiTDecoder(zc, (zh, zw), self.frames, decoder_patch_size, decoder_embed_dim,
                                      decoder_num_heads, decoder_depth, time_dim, global_channels,
                                      detail_channels if detailed else None, detail_tokens)
        self.freezing = FreezeSchedule(freeze, freeze_schedule)
        self.freezing.check(self, "model.freeze / model.freeze_schedule")
        freeze_names(self, self.freezing.initial_frozen())

    # -- training-stage state (nn/freeze.py) ----------------------------------------------------------
    def on_train_step_end(self, step: int, total: int) -> None:
        self.freezing.apply(self, step)

    # -- encoding ------------------------------------------------------------------------------------
    def frame_latents(self, batch: dict) -> torch.Tensor:
        """(B, C, T, H, W) in [-1, 1] -> (B, T, c, h, w) image-VAE latents (no gradient: the VAE is frozen).
        A batch may carry them precomputed as `latents` (the frozen VAE's posterior mean is a fixed function of
        the frames; scripts/proof_hi_vae.py encodes every frame once instead of once per step)."""
        if "latents" in batch:
            return batch["latents"]
        x = batch["x"]
        b = x.shape[0]
        z = self.image_vae.encode(_frames_first(x).flatten(0, 1))
        return z.view(b, -1, *z.shape[1:])

    def motion(self, z_ref: torch.Tensor, z_tgt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Motion latents from the reference latent (B, c, h, w) and the target latents (B, F, c, h, w)."""
        f = z_tgt.shape[1]
        both = torch.cat([z_ref[:, None].expand(-1, f, -1, -1, -1), z_tgt], 1)  # [ref × F ; targets] in time
        low = frequency_filter_3d(both.transpose(1, 2), *self.lowpass, "low").transpose(1, 2)[:, f:]
        out = {"u_g": self.global_encoder(low)}
        if self.detail_encoder is not None:
            tokens = self._detail(torch.cat([z_ref[:, None], z_tgt], 1))  # (B, 1 + F, n_d, c_d)
            out["u_d_ref"], out["u_d"] = tokens[:, 0], tokens[:, 1:]
        return out

    def _detail(self, frames: torch.Tensor) -> torch.Tensor:
        if self.detail_filter == "high":
            frames = frequency_filter_2d(frames, self.highpass_d, "high")
        return self.detail_encoder(frames)

    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, z_ref: torch.Tensor, motion: dict) -> torch.Tensor:
        return self.decoder(z_t, z_ref, t, motion.get("u_g"), motion.get("u_d_ref"), motion.get("u_d"))

    # -- the contract --------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        progress = batch.get("progress")
        if self.training and progress is not None and self.freezing:  # a resumed run starts in its stage
            self.freezing.apply(self, progress.step)
        z = self.frame_latents(batch)
        z_ref, z_tgt = z[:, 0], z[:, 1:]
        motion = self.motion(z_ref, z_tgt)
        t = sample_t(z.shape[0], self.t_schedule, device=z.device)
        noise = torch.randn_like(z_tgt)
        z_t = interpolate(z_tgt, noise, t)
        v = self.velocity(z_t, t, z_ref, motion)
        return {"v_pred": v, "v_target": velocity_target(z_tgt, noise), **motion}

    def latents(self, batch: dict) -> dict[str, torch.Tensor]:
        """Everything the decoder needs to rebuild the clip: the reference-frame latent z_ref, the global
        motion u_g and (stage detailed) the target frames' detailed tokens u_d. The reference's own detailed
        tokens are not stored: the detailed encoder recomputes them from z_ref."""
        z = self.frame_latents(batch)
        motion = self.motion(z[:, 0], z[:, 1:])
        motion.pop("u_d_ref", None)
        return {"z_ref": z[:, 0], **motion}

    @torch.no_grad()
    def decode_latents(self, latents: dict[str, torch.Tensor], steps: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Clip (B, C, T, H, W) in [-1, 1] from `latents()`: Euler from fixed noise (`sample_seed`), then the
        image VAE per frame; frame 0 is the reference latent decoded."""
        z_ref = latents["z_ref"]
        motion = {k: v for k, v in latents.items() if k != "z_ref"}
        if self.detail_encoder is not None:
            motion["u_d_ref"] = self._detail(z_ref[:, None])[:, 0]
        b = z_ref.shape[0]
        f = motion["u_g"].shape[1] if self.global_encoder.output == "frames" else self.frames
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(self.sample_seed)
        noise = torch.randn(b, f, *self.latent_shape, generator=generator).to(z_ref)
        z_tgt = euler_sample(lambda x, t: self.velocity(x, t, z_ref, motion), noise, steps or self.sample_steps)
        z = torch.cat([z_ref[:, None], z_tgt], 1)
        frames = self.image_vae.decode(z.flatten(0, 1))
        return _frames_first(frames.view(b, -1, *frames.shape[1:]))

    def reconstruct(self, batch: dict) -> torch.Tensor:
        return self.decode_latents(self.latents(batch))

    def encode(self, batch: dict) -> torch.Tensor:
        """Features for probes: the global motion latent, flattened."""
        return self.latents(batch)["u_g"].flatten(1)


class FrameKLVAE(AutoencoderModel):
    """The offline stand-in for SD-VAE: a diffusers AutoencoderKL trained per frame on video clips (any T).
    Outputs recon (B, C, T, H, W) and the posterior's mu / logvar per frame (for objectives/kl.py GaussianKL);
    keeps a running std of the latents (`latent_std`), from which FrozenImageVAE takes its scaling factor
    (the role of SD-VAE's 0.18215: unit-variance latents for the flow)."""

    modality = "video"

    def __init__(self, input_shape: tuple[int, ...], block_out_channels: list[int] = (32, 64, 64, 64),
                 latent_channels: int = 4, layers_per_block: int = 1, norm_num_groups: int = 32,
                 std_momentum: float = 0.01):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.vae = build_autoencoder_kl(list(block_out_channels), latent_channels, layers_per_block,
                                        norm_num_groups, in_channels=input_shape[0])
        self.register_buffer("latent_std", torch.ones(()))
        self.std_momentum = std_momentum

    def _posterior(self, x: torch.Tensor):
        return self.vae.encode(_frames_first(x).flatten(0, 1)).latent_dist

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["x"]
        dist = self._posterior(x)
        z = dist.sample()
        if self.training:
            with torch.no_grad():
                self.latent_std.lerp_(dist.mean.float().std(), self.std_momentum)
        recon = self.vae.decode(z).sample
        recon = _frames_first(recon.view(x.shape[0], -1, *recon.shape[1:]))
        return {"recon": recon, "mu": dist.mean.flatten(1), "logvar": dist.logvar.flatten(1)}

    def latents(self, batch: dict) -> dict[str, torch.Tensor]:
        mean = self._posterior(batch["x"]).mean
        return {"z": mean.view(batch["x"].shape[0], -1, *mean.shape[1:])}

    def decode_latents(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        z = latents["z"]
        frames = self.vae.decode(z.flatten(0, 1)).sample
        return _frames_first(frames.view(z.shape[0], -1, *frames.shape[1:]))

    def reconstruct(self, batch: dict) -> torch.Tensor:
        return self.decode_latents(self.latents(batch))

    def encode(self, batch: dict) -> torch.Tensor:
        return self.latents(batch)["z"].flatten(1)
