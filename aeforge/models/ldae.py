"""LDAE — latent diffusion autoencoders for 3-D volumes (card 7, Lozupone et al. 2025), in three stages:

1. `stage=aekl`: a 3-D AutoencoderKL (MONAI's `monai.networks.nets.AutoencoderKL`) trained on voxels
   (L1 + KL + 2.5-D LPIPS + 3-D PatchGAN, objective `ldae_aekl`, module=gan).
2. `stage=ddpm`: the AEKL frozen; an unconditional latent DDPM (`aeforge/nn/diffusion_unet.py`, ε-prediction,
   T = 1000 linear β) trained on its latents z0 = scale · μ(x) (objective `ldae_ddpm`).
3. `stage=semantic`: AEKL and DDPM frozen; a 2.5-D semantic encoder y = Enc(x) (a 2-D CNN over the slices,
   soft-attention pooled) and the trainable shift branch G (a fresh middle + output half of the UNet on the
   frozen input half's features, y added to its time embedding, zero-initialised output conv) learn
   ε ≈ ε_θ(z_t, t) + c_t · G(z_t, t, y) with c_t = −sqrt(α_t)(1 − ᾱ_{t−1}) / sqrt(1 − ᾱ_t), weighted by
   w_t = SNR_t^0.1 / (1 + SNR_t) (PDAE's posterior-mean-gap filling; objective `ldae_semantic`).

Stages chain by the top-level `ckpt=<previous stage's checkpoint>` (train.py copies every weight whose name
matches; the modules a stage adds keep their initialisation). Each stage builds only the parts it uses.
`encode(batch)`: y (stage semantic) or the AEKL's flattened μ (earlier stages, a baseline for probes).
`reconstruct(batch)`: DDIM encode (η = 0) → DDIM decode → AEKL decode at stage semantic (with y), the AEKL
alone before; `aekl_reconstruct` and `ddim_reconstruct` give each path explicitly."""

from __future__ import annotations

import logging

import torch
from torch import nn

from aeforge.checkpoints import load_checkpoint
from aeforge.models.base import AutoencoderModel
from aeforge.nn.diffusion import NoiseSchedule
from aeforge.nn.diffusion_unet import DiffusionUNet, zero_

log = logging.getLogger(__name__)

STAGES = ("aekl", "ddpm", "semantic")
BACKBONES = ("convnext_small", "cnn")


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class SliceEncoder(nn.Module):
    """2.5-D semantic encoder: every slice along `slice_axis` through a 2-D backbone, per-slice features pooled
    by soft attention (softmax over slices of a learned score), projected to `out_dim` (identity if equal).

    backbone "convnext_small": torchvision's ConvNeXt-Small (768-d), its RGB stem summed to one grey channel;
    ImageNet weights from `weights` (a torchvision state_dict path), else random with a warning.
    backbone "cnn": `channels` stride-2 conv-GN-SiLU layers + global average pool (the card's CPU setting)."""

    def __init__(self, backbone: str, out_dim: int, weights: str | None, channels: list[int], slice_axis: int):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"model.encoder_backbone={backbone!r}; valid: {list(BACKBONES)}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"model.slice_axis={slice_axis}; valid: 0, 1, 2 (D, H, W of the volume)")
        self.slice_axis = slice_axis
        if backbone == "convnext_small":
            self.backbone, feat = self._convnext(weights), 768
        else:
            layers, c = [], 1
            for width in channels:
                layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU()]
                c = width
            self.backbone, feat = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c
        self.score = nn.Linear(feat, 1)
        self.proj = nn.Identity() if feat == out_dim else nn.Linear(feat, out_dim)

    @staticmethod
    def _convnext(weights: str | None) -> nn.Module:
        from torchvision.models import convnext_small

        net = convnext_small(weights=None)
        if weights is not None:
            state = load_checkpoint(weights, what="model.encoder_weights (torchvision ConvNeXt-Small)")
            net.load_state_dict(state.get("state_dict", state))
        else:
            log.warning("LDAE semantic encoder: ConvNeXt-Small is RANDOMLY initialised (model.encoder_weights=null); "
                        "the card's is ImageNet-pretrained: give the torchvision state_dict path for that")
        stem = net.features[0][0]
        grey = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride)
        with torch.no_grad():  # the usual grey adaptation: the RGB filters summed
            grey.weight.copy_(stem.weight.sum(1, keepdim=True))
            grey.bias.copy_(stem.bias)
        net.features[0][0] = grey
        return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        slices = x.movedim(2 + self.slice_axis, 1)  # (B, S, C, h, w)
        s = slices.shape[1]
        feats = self.backbone(slices.reshape(b * s, *slices.shape[2:])).view(b, s, -1)
        attn = torch.softmax(self.score(feats), dim=1)
        return self.proj((attn * feats).sum(1))


class LDAE(AutoencoderModel):
    modality = "volume"

    def __init__(
        self,
        input_shape: list[int],
        stage: str = "aekl",
        ae_channels: list[int] = (64, 128, 128, 128),
        ae_res_blocks: int = 2,
        latent_channels: int = 3,
        ae_groups: int = 32,
        unet_channels: int = 128,
        unet_mult: list[int] = (1, 2, 4),
        unet_res_blocks: int = 2,
        unet_attention: list[int] = (2, 4),
        unet_heads: int = 1,
        unet_dropout: float = 0.1,
        unet_groups: int = 32,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        latent_scale: float | None = None,
        encoder_backbone: str = "convnext_small",
        encoder_weights: str | None = None,
        encoder_channels: list[int] = (32, 64, 128),
        semantic_dim: int = 768,
        slice_axis: int = 0,
        ddim_steps: int = 100,
    ):
        super().__init__()
        from monai.networks.nets import AutoencoderKL

        if stage not in STAGES:
            raise ValueError(f"model.stage={stage!r}; valid: {list(STAGES)}")
        if len(input_shape) != 4:
            raise ValueError(f"LDAE takes volumes (C, D, H, W); the data gives {tuple(input_shape)}")
        down = 2 ** (len(ae_channels) - 1)
        if any(s % down for s in input_shape[1:]):
            raise ValueError(f"volume sides {tuple(input_shape[1:])} must be divisible by {down} (the AEKL's "
                             f"{len(ae_channels) - 1} downsamplings, model.ae_channels)")
        self.stage, self.input_shape, self.ddim_steps = stage, tuple(input_shape), ddim_steps
        # MONAI's AEKL as the card configures it: no attention anywhere, latent_channels at /2^(levels-1)
        self.aekl = AutoencoderKL(
            spatial_dims=3, in_channels=input_shape[0], out_channels=input_shape[0], channels=list(ae_channels),
            num_res_blocks=ae_res_blocks, attention_levels=[False] * len(ae_channels), latent_channels=latent_channels,
            norm_num_groups=ae_groups, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        )
        # 0 = not measured yet: set from the first training batch's latents (1 / std, LDM's rule); saved with it
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale or 0.0)))
        self.frozen: list[str] = []
        if stage == "aekl":
            return
        _freeze(self.aekl)
        self.frozen = ["aekl"]
        unet = dict(dims=3, in_channels=latent_channels, out_channels=latent_channels, base_channels=unet_channels,
                    channel_mult=list(unet_mult), num_res_blocks=unet_res_blocks,
                    attention_factors=list(unet_attention), heads=unet_heads, dropout=unet_dropout, groups=unet_groups)
        self.unet = DiffusionUNet(**unet)
        self.schedule = NoiseSchedule(beta_schedule, timesteps)
        if stage == "ddpm":
            return
        _freeze(self.unet)
        self.frozen.append("unet")
        self.encoder = SliceEncoder(encoder_backbone, semantic_dim, encoder_weights, list(encoder_channels),
                                    slice_axis)
        self.shift = DiffusionUNet(**unet, decoder_only=True)
        zero_(self.shift.out)  # G = 0 at the start: the shifted model is the frozen one
        self.condition = nn.Linear(semantic_dim, self.unet.emb_dim)  # y enters the branch's time embedding

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:  # frozen parts stay in eval mode (no dropout in ε_θ, no norm updates)
            getattr(self, name).eval()
        return self

    def last_layer_weight(self) -> torch.Tensor:
        """The AEKL decoder's output conv weight (the GAN's adaptive weight reads its gradients)."""
        return self.aekl.decoder.blocks[-1].conv.weight

    # -- the pieces ---------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, x: torch.Tensor, measure_scale: bool = False) -> torch.Tensor:
        """z0 = scale · μ(x); the scale is measured on the first call that may (a training batch)."""
        mu, _ = self.aekl.encode(x)
        if float(self.latent_scale) == 0.0:
            if not measure_scale:
                return mu
            self.latent_scale.fill_(1.0 / mu.float().std().clamp(min=1e-6).item())
            log.info("LDAE latent scale measured on a training batch: %.4f", float(self.latent_scale))
        return mu * self.latent_scale

    def decode_latents(self, z0: torch.Tensor) -> torch.Tensor:
        scale = self.latent_scale if float(self.latent_scale) != 0.0 else torch.ones_like(self.latent_scale)
        return self.aekl.decode(z0 / scale)

    def shift_coefficient(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """c_t = −sqrt(α_t)(1 − ᾱ_{t−1}) / sqrt(1 − ᾱ_t) (ᾱ_{−1} = 1), broadcast against `like`."""
        a_bar, a_prev = self.schedule.alpha_bar(t, like), self.schedule.alpha_bar(t - 1, like)
        alpha = a_bar / a_prev
        return -alpha.sqrt() * (1 - a_prev) / (1 - a_bar).sqrt()

    def semantic_eps(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(ε_θ(z_t, t) of the frozen DDPM, G(z_t, t, y) of the shift branch; None without y)."""
        with torch.no_grad():
            emb = self.unet.embed(t)
            h, skips = self.unet.encode_path(z_t, emb)
            eps = self.unet.decode_path(h, skips, emb)
        if y is None:
            return eps, None
        return eps, self.shift.decode_path(h, skips, emb + self.condition(y))

    def eps_fn(self, y: torch.Tensor | None):
        """ε for DDIM: the frozen DDPM's, shifted by c_t · G when y is given (stage semantic)."""
        def fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if y is None or self.stage != "semantic":
                return self.unet(z_t, t)
            eps, g = self.semantic_eps(z_t, t, y)
            return eps + self.shift_coefficient(t, z_t) * g
        return fn

    # -- the contract -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        if self.stage == "aekl":
            mu, sigma = self.aekl.encode(x)
            z = mu + sigma * torch.randn_like(sigma) if self.training else mu
            return {"recon": self.aekl.decode(z), "mu": mu.flatten(1), "logvar": (2 * sigma.log()).flatten(1)}
        z0 = self.latents(x, measure_scale=self.training)
        t = self.schedule.sample_timesteps(z0.shape[0], device=z0.device)
        eps = torch.randn_like(z0)
        z_t = self.schedule.q_sample(z0, t, eps)
        if self.stage == "ddpm":
            return {"eps_pred": self.unet(z_t, t), "eps": eps}
        y = self.encoder(x)
        eps_frozen, g = self.semantic_eps(z_t, t, y)
        snr = self.schedule.snr(t).to(z0.device)
        return {"eps_pred": eps_frozen + self.shift_coefficient(t, z_t) * g, "eps": eps,
                "weight": snr.pow(0.1) / (1 + snr), "y_sem": y, "shift": g}

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.stage == "semantic":
            return self.encoder(batch["x"])
        return self.aekl.encode(batch["x"])[0].flatten(1)

    @torch.no_grad()
    def aekl_reconstruct(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.aekl.reconstruct(batch["x"])

    @torch.no_grad()
    def ddim_reconstruct(self, batch: dict[str, torch.Tensor], steps: int | None = None,
                         semantic: bool = True) -> torch.Tensor:
        """AEKL latents → DDIM encode (η = 0) → DDIM decode → AEKL decode; ε shifted by y at stage semantic."""
        if self.stage == "aekl":
            raise ValueError("ddim_reconstruct needs the latent DDPM (model.stage=ddpm or semantic)")
        steps = steps or self.ddim_steps
        x = batch["x"]
        y = self.encoder(x) if semantic and self.stage == "semantic" else None
        z0 = self.latents(x)
        z_T = self.schedule.ddim_encode(self.eps_fn(y), z0, steps)
        return self.decode_latents(self.schedule.ddim_sample(self.eps_fn(y), z_T, steps))

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.stage == "semantic":
            return self.ddim_reconstruct(batch)
        return self.aekl_reconstruct(batch)

    @torch.no_grad()
    def reconstruct_from_semantic(self, batch: dict[str, torch.Tensor], steps: int | None = None,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The card's "from y_sem only" row: z_T ~ N(0, I), DDIM decode with y."""
        if self.stage != "semantic":
            raise ValueError("reconstruct_from_semantic needs model.stage=semantic")
        y = self.encoder(batch["x"])
        z0 = self.latents(batch["x"])
        z_T = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        return self.decode_latents(self.schedule.ddim_sample(self.eps_fn(y), z_T, steps or self.ddim_steps))

