"""Hash-based (EDGE-style) mutual information estimator, batched, in bits.

Each variable (a ``[N, d]`` sample matrix) is hashed per sample: a fixed random projection ``z = x @ W``
(``W ~ N(0, 1)``; d = 1 needs none), standardised, then bucketed as ``floor((z + b) / eps)`` with a random
shift ``b ~ U[0, eps)``; ``eps = 4 / buckets`` so about ``buckets`` cells span +-2 standard deviations (tails
fall into the edge cells). With per-sample bucket counts ``N_i`` (X), ``M_j`` (Y) and ``N_ij`` (joint),

    I(X; Y) = mean over samples of clip(log2(N * N_ij / (N_i * M_j)), 0.001, 10)

and the estimate is the median over ``shifts`` random shifts. A joint variable ``[Y, Z]`` is hashed as the
tuple of its parts' codes (block-diagonal projection), so that a small Y is not drowned by a wide Z.
The lower clip makes the estimator biased upwards by a few hundredths of a bit when cells are crowded
enough (the automatic bucket count targets ~32 samples per joint cell); independent data still gives ~0.

Conditional MI, our formulation (the SNACS code does not publish one): ``I(X; Y | Z) = I(X; [Y, Z]) - I(X; Z)``.
"""
from __future__ import annotations

import torch

__all__ = ["auto_buckets", "hash_codes", "combine_codes", "mi_from_codes", "hash_mi", "hash_cmi"]

_CLIP = (0.001, 10.0)


def auto_buckets(n_samples: int, n_vars: int, occupancy: int = 32) -> int:
    """Buckets per variable so that the joint table of ``n_vars`` variables has ~``occupancy`` samples a cell."""
    b = round((n_samples / occupancy) ** (1.0 / n_vars))
    return int(min(32, max(2, b)))


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 1:
        return x[:, None]
    if x.dim() != 2:
        raise ValueError(f"samples must be [N] or [N, d], got shape {tuple(x.shape)}")
    return x


def project(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standardised 1-D random projection of the samples: ``[N, d] -> [N]`` (float64)."""
    x = _as_2d(x).double()
    if x.shape[1] == 1:
        z = x[:, 0]
    else:
        w = torch.randn(x.shape[1], generator=generator, dtype=torch.float64)
        z = x @ w.to(x.device)
    std = z.std(correction=0)
    return torch.zeros_like(z) if float(std) == 0.0 else (z - z.mean()) / std


def hash_codes(z: torch.Tensor, buckets: int, shift: float) -> torch.Tensor:
    """Bucket codes in ``[0, buckets + 2)`` of standardised values ``z`` (any shape, last dim = samples).

    ``shift`` in [0, 1) is the random offset b as a fraction of eps.
    """
    eps = 4.0 / buckets
    h = torch.floor((z + 2.0 + shift * eps) / eps)
    return h.clamp(0, buckets + 1).to(torch.int64)


def combine_codes(a: torch.Tensor, b: torch.Tensor, b_range: int) -> torch.Tensor:
    """Code of the tuple (a, b): ``a * b_range + b``."""
    return a * b_range + b


def _counts(codes: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Per-sample count of the sample's own code: ``[B, N]`` int codes -> ``[B, N]`` float counts."""
    table = torch.zeros(codes.shape[0], n_codes, dtype=torch.float64, device=codes.device)
    table.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
    return table.gather(1, codes)


def mi_from_codes(cx: torch.Tensor, cy: torch.Tensor, x_range: int, y_range: int) -> torch.Tensor:
    """EDGE MI (bits) of code pairs: ``cx, cy`` ``[B, N]`` (or ``[N]``) int64 -> ``[B]`` (or scalar)."""
    squeeze = cx.dim() == 1
    cx, cy = torch.atleast_2d(cx), torch.atleast_2d(cy)
    cx, cy = torch.broadcast_tensors(cx, cy)
    n = cx.shape[1]
    ni = _counts(cx.contiguous(), x_range)
    mj = _counts(cy.contiguous(), y_range)
    nij = _counts(combine_codes(cx, cy, y_range).contiguous(), x_range * y_range)
    pmi = torch.log2(n * nij / (ni * mj)).clamp(*_CLIP)
    out = pmi.mean(dim=1)
    return out[0] if squeeze else out


def _shifts(shifts: int, generator: torch.Generator | None) -> list[float]:
    if shifts < 1:
        raise ValueError(f"shifts must be >= 1, got {shifts}")
    return torch.rand(shifts, generator=generator, dtype=torch.float64).tolist()


def hash_mi(x: torch.Tensor, y: torch.Tensor, *, buckets: int | None = None, shifts: int = 5,
            generator: torch.Generator | None = None) -> float:
    """I(X; Y) in bits from samples ``x [N] or [N, dx]`` and ``y [N] or [N, dy]``.

    >>> x = torch.randn(2000); hash_mi(x, x + 0.1 * torch.randn(2000)) > 1.0
    True
    """
    x, y = _as_2d(x), _as_2d(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    b = buckets or auto_buckets(x.shape[0], 2)
    zx, zy = project(x, generator), project(y, generator)
    est = [float(mi_from_codes(hash_codes(zx, b, s), hash_codes(zy, b, s), b + 2, b + 2))
           for s in _shifts(shifts, generator)]
    return float(torch.tensor(est).median())


def hash_cmi(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, *, buckets: int | None = None, shifts: int = 5,
             generator: torch.Generator | None = None) -> float:
    """I(X; Y | Z) in bits as ``I(X; [Y, Z]) - I(X; Z)`` (each term the median over shifts)."""
    x, y, z = _as_2d(x), _as_2d(y), _as_2d(z)
    b = buckets or auto_buckets(x.shape[0], 3)
    zx, zy, zz = project(x, generator), project(y, generator), project(z, generator)
    joint, alone = [], []
    r = b + 2
    for s in _shifts(shifts, generator):
        cx, cy, cz = hash_codes(zx, b, s), hash_codes(zy, b, s), hash_codes(zz, b, s)
        joint.append(float(mi_from_codes(cx, combine_codes(cy, cz, r), r, r * r)))
        alone.append(float(mi_from_codes(cx, cz, r, r)))
    return float(torch.tensor(joint).median() - torch.tensor(alone).median())
