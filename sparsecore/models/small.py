"""Small models for the offline pruning benchmarks (scikit-learn digits 8x8, mnist1d length 40).

Both are plain chains of Linear/Conv2d layers (registration order = data order) with no BatchNorm, so
every pruner, including SNACS's consecutive-layer connectivity, applies without graph analysis.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """``in_features -> hidden... -> n_classes`` with ReLU; input ``[B, ...]`` is flattened.

    >>> MLP(64, 10, hidden=(128, 64))(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_features: int, n_classes: int, hidden: tuple[int, ...] = (128, 64)) -> None:
        super().__init__()
        dims = (in_features,) + tuple(hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """Two convs, a max-pool, one hidden Linear and a classifier.

    ``in_shape`` is ``(C, H, W)``: ``(1, 8, 8)`` for digits, ``(1, 1, 40)`` for mnist1d with
    ``kernel=(1, 5)`` and ``pool=(1, 2)``. Convs use 'same' padding so the flatten size is
    ``channels[-1] * (H // pool_h) * (W // pool_w)``.

    >>> SmallCNN((1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, channels: tuple[int, int] = (16, 32),
                 kernel: tuple[int, int] = (3, 3), pool: tuple[int, int] = (2, 2), hidden: int = 64) -> None:
        super().__init__()
        c, h, w = in_shape
        pad = (kernel[0] // 2, kernel[1] // 2)
        self.conv1 = nn.Conv2d(c, channels[0], kernel, padding=pad)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel, padding=pad)
        self.pool = nn.MaxPool2d(pool)
        self.fc = nn.Linear(channels[1] * (h // pool[0]) * (w // pool[1]), hidden)
        self.head = nn.Linear(hidden, n_classes)
        self.in_shape = tuple(in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc(x.flatten(1)))
        return self.head(x)
