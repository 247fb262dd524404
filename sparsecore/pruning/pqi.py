"""PQ Index and its SAP budget formulas (Diao et al., ICLR 2023).

``I(w) = 1 - (mean|w|^p)^(1/p) / (mean|w|^q)^(1/q)`` over the d unpruned weights (0 < p < q); I = 0 when
d = 0 (or all unpruned weights are zero); tiny negatives from rounding are clipped to 0. Larger I means
sparser, i.e. more compressible. The keep bound and the prune count are

    r = ceil(d * (1 + eta)^(-q/(q-p)) * (1 - I)^(q*p/(q-p)))
    c = floor(d * clamp(gamma * (1 - r/d), 0, beta))

With p=0.5, q=1, eta=0, gamma=1 the pruned fraction equals I (up to the floor); with p=1, q=2 the kept
fraction is (1 - I)^2 (up to the ceil). Everything is computed in float64; a relative guard of 1e-9 before
ceil/floor absorbs rounding so that an exact integer (e.g. d*(1-I) = k for a k-sparse vector) stays exact.
"""
from __future__ import annotations

import torch

__all__ = ["pq_index", "sap_keep_bound", "sap_prune_count"]

_GUARD = 1e-9


def _check_pq(p: float, q: float) -> None:
    if not (0 < p < q):
        raise ValueError(f"PQ Index needs 0 < p < q, got p={p}, q={q}")


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0, mask: torch.Tensor | None = None,
             dim: int | None = None) -> torch.Tensor:
    """PQ Index of the unpruned entries of ``w`` (float64).

    ``mask`` (bool, ``w``'s shape) marks the unpruned entries (default: all). ``dim=None`` gives one scalar
    over all entries; ``dim=1`` on a ``[out, K]`` matrix gives one value per row (neuron scope).

    >>> float(pq_index(torch.tensor([1.0, 0.0, 0.0, 0.0])))   # 1-sparse, equal magnitudes: 1 - 1/4
    0.75
    """
    _check_pq(p, q)
    a = w.detach().abs().double()
    keep = torch.ones_like(a) if mask is None else mask.to(torch.float64)
    if mask is not None and mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match w shape {tuple(w.shape)}")
    dims = tuple(range(a.dim())) if dim is None else (dim,)
    d = keep.sum(dim=dims)
    safe_d = d.clamp(min=1.0)
    norm_p = ((a.pow(p) * keep).sum(dim=dims) / safe_d).pow(1.0 / p)
    norm_q = ((a.pow(q) * keep).sum(dim=dims) / safe_d).pow(1.0 / q)
    index = 1.0 - norm_p / norm_q.clamp(min=torch.finfo(torch.float64).tiny)
    index = torch.where((d == 0) | (norm_q == 0), torch.zeros_like(index), index)
    return index.clamp(min=0.0)


def sap_keep_bound(d: torch.Tensor | int, index: torch.Tensor | float, p: float = 0.5, q: float = 1.0,
                   eta: float = 0.0) -> torch.Tensor:
    """``r = ceil(d * (1+eta)^(-q/(q-p)) * (1-I)^(q*p/(q-p)))``, clamped to [0, d] (int64, elementwise)."""
    _check_pq(p, q)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    d = torch.as_tensor(d, dtype=torch.float64)
    index = torch.as_tensor(index, dtype=torch.float64)
    x = d * (1.0 + eta) ** (-q / (q - p)) * (1.0 - index).clamp(min=0.0).pow(q * p / (q - p))
    r = torch.ceil(x - _GUARD * x.clamp(min=1.0))
    return torch.minimum(r.clamp(min=0.0), d).to(torch.int64)


def sap_prune_count(d: torch.Tensor | int, r: torch.Tensor | int, gamma: float = 1.0, beta: float = 0.9) -> torch.Tensor:
    """``c = floor(d * clamp(gamma * (1 - r/d), 0, beta))`` (int64, elementwise; 0 where d = 0)."""
    if gamma < 0 or not (0 <= beta <= 1):
        raise ValueError(f"need gamma >= 0 and beta in [0, 1], got gamma={gamma}, beta={beta}")
    d = torch.as_tensor(d, dtype=torch.float64)
    r = torch.as_tensor(r, dtype=torch.float64)
    frac = (gamma * (1.0 - r / d.clamp(min=1.0))).clamp(0.0, beta)
    y = d * frac
    c = torch.floor(y + _GUARD * y.clamp(min=1.0))
    return torch.where(d > 0, c, torch.zeros_like(c)).to(torch.int64)

