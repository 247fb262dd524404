"""Small CNNs for tests and demos: a VGG-style net and a MobileNet-style net (depthwise separable).

Both are ``torch.fx``-traceable and cover the channel couplings the slimming code must handle:
Conv -> BN -> ReLU -> Conv chains, flatten of a ``C x h x w`` map into a Linear, Linear chains (VGG);
depthwise convs whose input and output channels are one and the same, and inverted-residual adds
(MobileNet).

>>> vgg_small()(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["VGGSmall", "vgg_small", "InvertedResidual", "MobileNetSmall", "mobilenet_small"]


class VGGSmall(nn.Module):
    """``features`` (conv3x3-BN-ReLU stacks, ``"M"`` = 2x2 max-pool), then a 2x2 adaptive pool, flatten
    and a two-layer ``classifier``. ``x [B, in_channels, H, W] -> [B, num_classes]``."""

    def __init__(self, cfg: Sequence[int | str] = (16, "M", 32, "M", 48, 48), num_classes: int = 10,
                 in_channels: int = 3, hidden: int = 64, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            # Without BN the conv carries a bias, so bias slicing is exercised too.
            layers.append(nn.Conv2d(c, int(v), 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        # Flatten of a 2x2 map: each channel feeds 4 consecutive Linear inputs.
        self.classifier = nn.Sequential(nn.Linear(c * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(0.1),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_small(num_classes: int = 10, cfg: Sequence[int | str] = (16, "M", 32, "M", 48, 48),
              batch_norm: bool = True) -> VGGSmall:
    """A VGG-style net for CPU tests (~60k parameters with the default ``cfg``)."""
    return VGGSmall(cfg, num_classes, batch_norm=batch_norm)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act:
        mods.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*mods)


class InvertedResidual(nn.Module):
    """MobileNet-v2 block: 1x1 expand (skipped at ratio 1, which makes it MobileNet-v1's depthwise
    separable conv), 3x3 depthwise, 1x1 linear projection; identity add when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(c_in, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, c_out, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetSmall(nn.Module):
    """A small MobileNet: stem conv, inverted-residual stages, 1x1 head, mean over H, W, Linear.

    ``settings``: ``(expand_ratio, c_out, repeats, stride)`` per stage, as in MobileNet-v2's table.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem: int = 16, head: int = 64,
                 settings: Sequence[tuple[int, int, int, int]] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))):
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(in_channels, stem, 3, stride=2)]
        c = stem
        for t, c_out, n, s in settings:
            for i in range(n):
                blocks.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        blocks.append(_conv_bn(c, head, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))  # global average pool as a reduction over H, W
        return self.classifier(x)


def mobilenet_small(num_classes: int = 10) -> MobileNetSmall:
    """A MobileNet-v2-style net for CPU tests (depthwise convs plus residual adds)."""
    return MobileNetSmall(num_classes)
