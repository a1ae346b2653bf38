"""Convolutional encoder/decoder stacks with stride-2 stages."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvEncoder(nn.Module):
    """(C, H, W) -> vector: stride-2 3x3 convs through `channels`, then a linear map to `out_dim`."""

    def __init__(self, input_shape: tuple[int, int, int], channels: list[int], out_dim: int):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.GELU()]
            c, h, w = ch, math.ceil(h / 2), math.ceil(w / 2)
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c, h, w)
        self.head = nn.Linear(c * h * w, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: vector -> feature map -> stride-2 transposed convs -> (C, H, W)."""

    def __init__(self, input_shape: tuple[int, int, int], channels: list[int], in_dim: int):
        super().__init__()
        c_out, h, w = input_shape
        sizes = [(h, w)]
        for _ in channels:
            sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        self.start_shape = (channels[-1], *sizes[-1])
        self.fc = nn.Linear(in_dim, math.prod(self.start_shape))
        layers: list[nn.Module] = []
        rev = list(reversed(channels))
        for i, ch in enumerate(rev):
            nxt = rev[i + 1] if i + 1 < len(rev) else c_out
            target = sizes[len(channels) - 1 - i]
            up = nn.Upsample(size=target, mode="nearest")
            layers += [up, nn.Conv2d(ch, nxt, 3, padding=1)]
            if i + 1 < len(rev):
                layers += [nn.BatchNorm2d(nxt), nn.GELU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(self.fc(z).view(-1, *self.start_shape))
