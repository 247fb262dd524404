"""Score functions: importance per weight or per output channel. Selection rules live in masks.py."""
from __future__ import annotations

import torch

from ..masks import as_matrix


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w| in float32 (same shape as ``weight``)."""
    return weight.detach().abs().float()


def channel_norm(weight: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Lp norm of each output channel: ``[out, ...] -> [out]`` (float32)."""
    return torch.linalg.vector_norm(as_matrix(weight.detach()).float(), ord=p, dim=1)


def channel_rms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel divided by sqrt(K): comparable across layers of different K."""
    mat = as_matrix(weight.detach()).float()
    return torch.linalg.vector_norm(mat, dim=1) / max(1, mat.shape[1]) ** 0.5
