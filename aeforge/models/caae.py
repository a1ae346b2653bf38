"""CAAE: conditional adversarial autoencoder (Zhang, Song, Qi, CVPR 2017; card 8 of
/work/shared/methods/vae_video_generative.md).

E maps an image to a tanh-bounded code z; G decodes [z, tiled ±1 one-hot condition]; D_z tells z from the
uniform prior U(-1, 1)^d; D_img tells real (x, own condition) from (G(E(x), condition), condition), with the
condition injected as label maps after its first conv. Conditional generation = encode once, decode with any
condition (`generate`). The players' updates are the `caae` module's (aeforge/modules/caae.py); the losses
are aeforge/objectives/caae.py."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from aeforge.models.base import AutoencoderModel


def with_scratch_stats(module: nn.Module, *args) -> torch.Tensor:
    """`module(*args)` in its current mode (training: batch statistics, as the original) on copies of its
    buffers, so BN running statistics do not move: a discriminator's state changes only in its own update,
    not when the generator's loss reads it. (Restoring the buffers afterwards would break the backward pass,
    which keeps them.)"""
    state = {**dict(module.named_parameters()), **{n: b.clone() for n, b in module.named_buffers()}}
    return functional_call(module, state, args)


class ImageDiscriminator(nn.Module):
    """D_img: conv (BN, ReLU), then the condition's ±1 label maps concatenated, then the rest."""

    def __init__(self, first: nn.Module, rest: nn.Module):
        super().__init__()
        self.first, self.rest = first, rest

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        maps = cond[:, :, None, None].expand(-1, -1, *h.shape[2:])
        return self.rest(torch.cat([h, maps], dim=1)).squeeze(1)


def _init(module: nn.Module, std: float) -> None:
    # the official code: N(0, std^2) weights (truncated for convs), zero biases
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


def _conv(c_in: int, c_out: int, k: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)  # 'same' padding: ceil(H / stride)


def _deconv(c_in: int, c_out: int, k: int, stride: int) -> nn.ConvTranspose2d:
    # exactly doubles (stride 2) or keeps (stride 1) the size, as TF's 'same' transposed conv
    return nn.ConvTranspose2d(c_in, c_out, k, stride=stride, padding=k // 2, output_padding=stride - 1)


class CAAE(AutoencoderModel):
    """input_shape (C, H, W), H and W divisible by 2^len(enc_channels) (card: 128 -> 4 over 5 layers;
    MNIST 28 -> 7 over 2). gen_channels: the stride-2 deconvs (as many as enc_channels), gen_tail_channels:
    the stride-1 deconvs before the last one (card: [16]). label_repeat: copies of the condition one-hot
    in G's input (null: floor(latent_dim / num_classes), the card's rule, so the label weighs like z)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int = 50,
        enc_channels: list[int] = (64, 128, 256, 512, 1024),
        gen_channels: list[int] = (512, 256, 128, 64, 32),
        gen_tail_channels: list[int] = (16,),
        kernel_size: int = 5,
        label_repeat: int | None = None,
        dz_hidden: list[int] = (64, 32, 16),
        dimg_channels: list[int] = (16, 32, 64, 128),
        dimg_hidden: int = 1024,
        init_std: float = 0.02,
        condition_key: str = "y",
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CAAE needs (C, H, W) images, got input_shape={tuple(input_shape)}")
        c, h, w = input_shape
        if not num_classes or num_classes < 2:
            raise ValueError(f"CAAE needs a labelled DataModule (num_classes >= 2 conditions), got {num_classes}")
        down = 2 ** len(enc_channels)
        if h % down or w % down:
            raise ValueError(f"model.enc_channels: {len(enc_channels)} stride-2 layers need H, W divisible by "
                             f"{down}; the images are {h}x{w}")
        if len(gen_channels) != len(enc_channels):
            raise ValueError(f"model.gen_channels has {len(gen_channels)} entries; it needs one per encoder layer "
                             f"({len(enc_channels)}) to return to {h}x{w}")
        self.input_shape, self.num_classes, self.latent_dim = (c, h, w), num_classes, latent_dim
        self.condition_key = condition_key
        self.label_repeat = label_repeat or max(latent_dim // num_classes, 1)
        k = kernel_size

        enc: list[nn.Module] = []
        ch = c
        for out in enc_channels:
            enc += [_conv(ch, out, k, 2), nn.ReLU()]
            ch = out
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(ch * (h // down) * (w // down), latent_dim),
                                     nn.Tanh())

        self.start_shape = (enc_channels[-1], h // down, w // down)
        self.gen_fc = nn.Sequential(
            nn.Linear(latent_dim + num_classes * self.label_repeat, math.prod(self.start_shape)), nn.ReLU()
        )
        gen: list[nn.Module] = []
        ch = enc_channels[-1]
        for out in gen_channels:
            gen += [_deconv(ch, out, k, 2), nn.ReLU()]
            ch = out
        for out in gen_tail_channels:
            gen += [_deconv(ch, out, k, 1), nn.ReLU()]
            ch = out
        self.generator = nn.Sequential(*gen, _deconv(ch, c, k, 1), nn.Tanh())

        layers: list[nn.Module] = []
        width = latent_dim
        for hid in dz_hidden:
            layers += [nn.Linear(width, hid), nn.BatchNorm1d(hid), nn.ReLU()]
            width = hid
        self.d_z = nn.Sequential(*layers, nn.Linear(width, 1))

        first = nn.Sequential(_conv(c, dimg_channels[0], k, 2), nn.BatchNorm2d(dimg_channels[0]), nn.ReLU())
        rest: list[nn.Module] = []
        ch = dimg_channels[0] + num_classes  # + the condition's label maps
        size = (math.ceil(h / 2), math.ceil(w / 2))
        for out in dimg_channels[1:]:
            rest += [_conv(ch, out, k, 2), nn.BatchNorm2d(out), nn.ReLU()]
            ch, size = out, (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        rest = nn.Sequential(*rest, nn.Flatten(), nn.Linear(ch * size[0] * size[1], dimg_hidden),
                             nn.LeakyReLU(0.2), nn.Linear(dimg_hidden, 1))
        self.d_img = ImageDiscriminator(first, rest)
        _init(self, init_std)

    # -- pieces -----------------------------------------------------------------------------------------
    def condition(self, batch: dict) -> torch.Tensor:
        """The batch's condition as a ±1 one-hot (active +1, others -1: the image value range), (B, K)."""
        if self.condition_key not in batch:
            raise KeyError(f"CAAE reads its condition from batch[{self.condition_key!r}] (model.condition_key); "
                           f"the batch has {sorted(batch)}: use a labelled DataModule")
        return self.one_hot(batch[self.condition_key])

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(labels.long(), self.num_classes).float() * 2 - 1

    def encode(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch["x"])

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.gen_fc(torch.cat([z, cond.repeat(1, self.label_repeat)], dim=1))
        return self.generator(h.view(-1, *self.start_shape))

    def latent_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.d_z(z).squeeze(1)

    def image_logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.d_img(x, cond)

    def sample_prior(self, n: int) -> torch.Tensor:
        """z* ~ U(-1, 1)^d, the prior D_z holds the codes against."""
        return torch.rand(n, self.latent_dim, device=self.gen_fc[0].weight.device) * 2 - 1

    # -- the contract ---------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """What the E/G loss needs: z, the reconstruction at the image's own condition, and the
        discriminators' logits on them (BN statistics of the discriminators left as they were)."""
        cond = self.condition(batch)
        z = self.encode(batch)
        recon = self.decode(z, cond)
        dz_fake = with_scratch_stats(self.d_z, z).squeeze(1)
        dimg_fake = with_scratch_stats(self.d_img, recon, cond)
        return {"z": z, "recon": recon, "cond": cond, "dz_fake": dz_fake, "dimg_fake": dimg_fake}

    def latent_discriminator_outputs(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """D_z's logits on prior samples (real) and on the given codes (fake; detached by the caller)."""
        return {"dz_prior": self.latent_logits(self.sample_prior(len(z))), "dz_post": self.latent_logits(z)}

    def image_discriminator_outputs(self, x: torch.Tensor, recon: torch.Tensor,
                                    cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """D_img's logits on (real image, own condition) and (generated image, that condition)."""
        return {"dimg_real": self.image_logits(x, cond), "dimg_gen": self.image_logits(recon, cond)}

    def reconstruct(self, batch: dict) -> torch.Tensor:
        return self.decode(self.encode(batch), self.condition(batch))

    def generate(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        """Each image of the batch decoded at the condition `labels` (B,) instead of its own."""
        return self.decode(self.encode(batch), self.one_hot(labels.to(batch["x"].device)))
