"""GAN building blocks shared by the adversarial objectives (cards 2, 3, 5, 7 of vae_video_generative.md).

`PatchDiscriminator`: the pix2pix / VQGAN "N-layer" PatchGAN — one logit per receptive-field patch — in 2-D
(images, or videos scored frame by frame) and 3-D (videos (B, C, T, H, W), the 3-D PatchGAN of card 3).
`hinge_d_loss`, `hinge_g_loss`, `vanilla_d_loss`, `vanilla_g_loss`: the discriminator / generator losses.
`adaptive_weight`: the VQGAN/LDM balance λ = ‖∇_w L_rec‖ / (‖∇_w L_G‖ + eps), clamped to [0, max_weight] and
detached, with `w` the decoder's last layer weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init_weights(m: nn.Module) -> None:
    # pix2pix / taming init: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: conv(stride 2) + LeakyReLU, then `layers − 1` conv(stride 2) + BN + LeakyReLU with
    channels doubling up to 8×, one conv(stride 1) + BN + LeakyReLU, and a 1-channel conv → patch logits.

    dims=2: input (B, C, H, W); a 5-D video is scored per frame (frames folded into the batch).
    dims=3: input (B, C, T, H, W). Time is strided only by the first two convs, so short clips (down to one
    frame, as in joint image–video batches) keep a valid shape; with the 3-D default kernel 3 / padding 1 every
    size ≥ 1 is legal. The 2-D default kernel 4 / padding 1 is pix2pix's and needs H, W ≥ 3·2^layers."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        layers: int = 3,
        dims: int = 2,
        kernel: int | None = None,
        norm: str = "batch",
    ):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"PatchDiscriminator dims={dims!r}; valid: [2, 3]")
        if norm not in ("batch", "none"):
            raise ValueError(f"PatchDiscriminator norm={norm!r}; valid: ['batch', 'none']")
        if layers < 1:
            raise ValueError(f"PatchDiscriminator layers must be >= 1, got {layers}")
        self.dims, self.layers = dims, layers
        self.kernel = kernel if kernel is not None else (4 if dims == 2 else 3)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d

        def stride(i: int, strided: bool):
            if dims == 2:
                return 2 if strided else 1
            return (2 if strided and i < 2 else 1, 2 if strided else 1, 2 if strided else 1)

        def block(c_in: int, c_out: int, i: int, strided: bool, normed: bool) -> list[nn.Module]:
            use_norm = normed and norm == "batch"
            mods: list[nn.Module] = [conv(c_in, c_out, self.kernel, stride(i, strided), 1, bias=not use_norm)]
            if use_norm:
                mods.append(bn(c_out))
            return mods + [nn.LeakyReLU(0.2, inplace=True)]

        mods = block(in_channels, channels, 0, True, False)
        c = channels
        for i in range(1, layers):
            c_next = channels * min(2**i, 8)
            mods += block(c, c_next, i, True, True)
            c = c_next
        c_next = channels * min(2**layers, 8)
        mods += block(c, c_next, layers, False, True)
        mods.append(conv(c_next, 1, self.kernel, 1, 1))
        self.net = nn.Sequential(*mods)
        self.apply(_init_weights)

    def min_size(self) -> int:
        """Smallest spatial side this discriminator accepts (each stride-1 conv of kernel k, padding 1 shrinks
        a side by k − 3; stride-2 convs map s to floor((s + 2 − k) / 2) + 1)."""
        size = 1
        while True:
            s = size
            for _ in range(self.layers):
                s = (s + 2 - self.kernel) // 2 + 1
                if s < 1:
                    break
            if s >= 1 and s + 2 * (3 - self.kernel) >= 1:
                return size
            size += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = self.dims + 2
        if self.dims == 2 and x.ndim == 5:  # per-frame scoring of a video
            b, c, t, h, w = x.shape
            x = x.transpose(1, 2).reshape(b * t, c, h, w)
        if x.ndim != want:
            raise ValueError(
                f"PatchDiscriminator(dims={self.dims}) takes {want}-D input"
                f"{' (or 5-D video, scored per frame)' if self.dims == 2 else ''}, got shape {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size():
            raise ValueError(
                f"PatchDiscriminator(layers={self.layers}, kernel={self.kernel}) needs H, W >= {self.min_size()}, "
                f"got {tuple(x.shape[-2:])}: use fewer layers or a larger input"
            )
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½ [mean ReLU(1 − D(x)) + mean ReLU(1 + D(x̂))]."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−mean D(x̂)."""
    return -fake_logits.float().mean()


def vanilla_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½ [mean softplus(−D(x)) + mean softplus(D(x̂))] (the non-saturating GAN's BCE)."""
    return 0.5 * (F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean())


def vanilla_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """mean softplus(−D(x̂)) (non-saturating generator loss)."""
    return F.softplus(-fake_logits.float()).mean()


GAN_LOSSES = {"hinge": (hinge_d_loss, hinge_g_loss), "vanilla": (vanilla_d_loss, vanilla_g_loss)}


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """λ = ‖∇_w rec_loss‖ / (‖∇_w g_loss‖ + eps), clamped to [0, max_weight], detached (VQGAN/LDM; RAE uses
    eps = 1e-6). Both losses must depend on `last_layer_weight`; their graphs are kept for the backward pass."""
    try:
        rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    except RuntimeError as e:
        raise RuntimeError(
            "adaptive_weight: the reconstruction and generator losses must both depend on the model's "
            f"last_layer_weight() (the decoder's final layer) and carry gradients ({e})"
        ) from e
    weight = rec_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
