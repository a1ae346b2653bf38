"""Prototype network (Li, Liu, Chen, Rudin, AAAI 2018): a convolutional autoencoder whose latent space holds
`m` learnable prototypes; the class logits are a bias-free linear map of the squared distances from the
encoded input to every prototype, so each prediction is explained by the prototypes it is near, and each
prototype is shown by decoding it. Losses: aeforge/objectives/prototype.py; evaluator: aeforge/eval/prototype_net.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aeforge.models.base import AutoencoderModel


def squared_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, D) x (M, D) -> (B, M) squared Euclidean distances as ||z||^2 + ||p||^2 - 2 z.p (one matmul, the
    card's form), clamped at 0 against round-off."""
    d = z.pow(2).sum(1, keepdim=True) + prototypes.pow(2).sum(1)[None] - 2 * z @ prototypes.T
    return d.clamp_min(0)


class PrototypeLayer(nn.Module):
    """`num_prototypes` vectors in the latent space, initialised U[0, 1) [card: CAE_MNIST.py]; forward returns
    the (B, M) squared distances of the inputs to them."""

    def __init__(self, num_prototypes: int, dim: int):
        super().__init__()
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return squared_distances(z, self.prototypes)


class PrototypeNetwork(AutoencoderModel):
    """Encoder: stride-2 3x3 convs with ReLU through `channels` (28 -> 14 -> 7 -> 4 -> 2 on MNIST), flattened to
    f(x) (2*2*10 = 40 dims with the paper's channels). Decoder: the mirrored transposed convs, ReLU except a
    final sigmoid (inputs are expected in [0, 1]: the recipe sets data.mean=[0], data.std=[1]). Head: logits =
    d(x) W with W (M, C) initialised U[0, 1), no bias.

    init_std: conv weights N(0, init_std^2) with zero biases, as the official code [card]; null keeps PyTorch's
    default initialisation."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int],
        num_prototypes: int = 15,
        init_std: float | None = 0.01,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"PrototypeNetwork needs (C, H, W) images, got input_shape={tuple(input_shape)}")
        if not num_classes:
            raise ValueError("PrototypeNetwork needs labelled data (the DataModule reports no num_classes)")
        c, h, w = self.input_shape = tuple(input_shape)
        sizes = [(h, w)]
        enc: list[nn.Module] = []
        for ch in channels:
            enc += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.ReLU()]
            c = ch
            sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        self.encoder = nn.Sequential(*enc)
        self.latent_shape = (channels[-1], *sizes[-1])
        self.latent_dim = math.prod(self.latent_shape)
        dec: list[nn.Module] = []
        outs = [*reversed(channels[:-1]), input_shape[0]]
        c = channels[-1]
        for i, ch in enumerate(outs):
            (hi, wi), (ho, wo) = sizes[-1 - i], sizes[-2 - i]
            # output_padding picks the mirrored size exactly (7 -> 14 needs 1, 4 -> 7 needs 0)
            pad = (ho - (2 * hi - 1), wo - (2 * wi - 1))
            dec += [nn.ConvTranspose2d(c, ch, 3, stride=2, padding=1, output_padding=pad)]
            dec += [nn.ReLU()] if i + 1 < len(outs) else [nn.Sigmoid()]
            c = ch
        self.decoder = nn.Sequential(*dec)
        self.prototype_layer = PrototypeLayer(num_prototypes, self.latent_dim)
        self.class_weights = nn.Parameter(torch.rand(num_prototypes, num_classes))
        if init_std is not None:
            for m in [*self.encoder, *self.decoder]:
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.view(-1, *self.latent_shape))

    def encode(self, batch):
        return self.latent(batch["x"])

    def forward(self, batch):
        z = self.latent(batch["x"])
        distances = self.prototype_layer(z)
        return {
            "z": z,
            "recon": self.decode(z),
            "distances": distances,
            "logits": distances @ self.class_weights,
        }

    @torch.no_grad()
    def decode_prototypes(self) -> torch.Tensor:
        """The prototypes as images (M, C, H, W) in the data's [0, 1] range."""
        return self.decode(self.prototype_layer.prototypes)
