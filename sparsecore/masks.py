"""Masks: the one hand-off type between pruning and packing.

A mask is a ``torch.bool`` tensor with exactly the weight's shape; ``True`` means *keep*.
Three kinds exist:

* unstructured: any pattern;
* N:M: along the reduction dimension K, every group of ``m`` consecutive entries keeps at most ``n``;
* channel: whole output channels (rows of the ``[out, K]`` matrix view) are kept or dropped.

The ``[out, K]`` matrix view of a weight (``as_matrix``) is the one every selection rule and format
uses. For a Linear weight ``[out, in]`` it is the weight itself. For a Conv2d weight
``[C_out, C_in, kh, kw]`` it is ``weight.permute(0, 2, 3, 1).reshape(C_out, kh * kw * C_in)``: K is
ordered (kh, kw, C_in) as in an NHWC implicit GEMM, so N:M groups run along C_in.

Tie rule (fixed once, tested exactly): among equal scores at the cut-off the lower flat index is kept
first, so ``keep_topk(scores, k)`` keeps exactly ``k`` entries.
"""
from __future__ import annotations

import torch

__all__ = [
    "PatternError",
    "as_matrix",
    "from_matrix",
    "keep_topk",
    "keep_n_of_m",
    "keep_channels",
    "channel_to_weight_mask",
    "check_mask",
    "check_nm",
    "check_channel",
    "is_nm",
    "sparsity",
    "keep_count",
]


class PatternError(ValueError):
    """A mask does not follow the pattern it claims (N:M group over budget, partial channel, ...)."""


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a weight (or mask/score) tensor as its ``[out, K]`` matrix.

    Shapes: ``[out, in] -> [out, in]``; ``[C_out, C_in, kh, kw] -> [C_out, kh*kw*C_in]`` (K ordered
    (kh, kw, C_in)). Other ranks raise ``ValueError``.
    """
    if t.dim() == 2:
        return t
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    raise ValueError(f"expected a 2-D Linear or 4-D Conv2d weight, got shape {tuple(t.shape)}")


def from_matrix(mat: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``as_matrix``: ``[out, K]`` back to the weight's ``shape`` (2-D or 4-D)."""
    shape = tuple(shape)
    if len(shape) == 2:
        if tuple(mat.shape) != shape:
            raise ValueError(f"matrix shape {tuple(mat.shape)} does not match {shape}")
        return mat
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        if tuple(mat.shape) != (c_out, kh * kw * c_in):
            raise ValueError(f"matrix shape {tuple(mat.shape)} does not match conv shape {shape}")
        # clone, not .contiguous(): for 1x1 kernels the permuted view already counts as contiguous but keeps
        # channels-last strides, which oneDNN/cuDNN then propagate to every later activation, slowing the whole
        # model. The clone has the standard strides of a freshly made weight.
        return mat.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
    raise ValueError(f"expected a 2-D or 4-D shape, got {shape}")


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be a real floating or integer tensor, got {scores.dtype}")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf; cannot rank them")


def keep_count(n: int, sparsity: float) -> int:
    """Number of entries kept out of ``n`` at ``sparsity``: ``n - round(n * sparsity)``.

    ``sparsity`` must lie in [0, 1]. Rounding is Python's ``round`` of the pruned count, so the
    zero count is ``round(n * sparsity)`` exactly.
    """
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) <= 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    return n - int(round(n * float(sparsity)))


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest scores (any shape); ties go to the lower flat index.

    Returns a bool mask with ``scores``' shape and exactly ``k`` True entries.

    >>> keep_topk(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2)
    tensor([False,  True,  True, False])
    """
    _check_scores(scores)
    numel = scores.numel()
    if not (0 <= int(k) <= numel):
        raise ValueError(f"k must be in [0, {numel}], got {k}")
    flat = scores.reshape(-1)
    # A stable descending sort keeps equal scores in index order: lower index first.
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=scores.device)
    mask[order[: int(k)]] = True
    return mask.reshape(scores.shape)


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` along K of the ``[out, K]`` view.

    ``scores`` has a weight's shape (2-D or 4-D). ``K`` must be a multiple of ``m``. Ties inside a group
    go to the lower index. Returns a bool mask of ``scores``' shape with exactly ``n`` per group.
    """
    _check_nm_params(n, m)
    _check_scores(scores)
    mat = as_matrix(scores)
    out, k_dim = mat.shape
    if k_dim % m:
        raise ValueError(f"N:M needs K divisible by m={m}; K={k_dim} (weight shape {tuple(scores.shape)})")
    groups = mat.reshape(out, k_dim // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return from_matrix(keep.reshape(out, k_dim), scores.shape)


def keep_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` output channels with the largest score. ``scores``: ``[out]`` -> bool ``[out]``."""
    if scores.dim() != 1:
        raise ValueError(f"channel scores must be 1-D [out], got shape {tuple(scores.shape)}")
    return keep_topk(scores, k)


def channel_to_weight_mask(channel_mask: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Broadcast a ``[out]`` channel mask to a full weight mask of ``weight_shape``."""
    if channel_mask.dtype != torch.bool or channel_mask.dim() != 1:
        raise TypeError(f"channel mask must be a 1-D bool tensor, got {channel_mask.dtype} {tuple(channel_mask.shape)}")
    if channel_mask.shape[0] != weight_shape[0]:
        raise ValueError(f"channel mask has {channel_mask.shape[0]} entries, weight has {weight_shape[0]} output channels")
    view = (-1,) + (1,) * (len(weight_shape) - 1)
    return channel_mask.reshape(view).expand(tuple(weight_shape)).clone()


def check_mask(mask: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise unless ``mask`` is a bool tensor of ``weight``'s shape on ``weight``'s device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device}, weight on {weight.device}")


def _check_nm_params(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not (0 < n <= m):
        raise ValueError(f"N:M needs integers 0 < n <= m, got n={n!r}, m={m!r}")


def check_nm(mask: torch.Tensor, n: int, m: int) -> None:
    """Raise ``PatternError`` unless every group of ``m`` along K keeps at most ``n``.

    Names the first offending (row, group) so a user can find it.
    """
    _check_nm_params(n, m)
    mat = as_matrix(mask)
    out, k_dim = mat.shape
    if k_dim % m:
        raise PatternError(f"N:M {n}:{m} needs K divisible by {m}; K={k_dim}")
    counts = mat.reshape(out, k_dim // m, m).sum(-1)
    bad = (counts > n).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise PatternError(
            f"mask breaks {n}:{m}: row {r}, group {g} (K positions {g * m}..{g * m + m - 1}) keeps "
            f"{int(counts[r, g])} > {n}; {bad.shape[0]} groups over budget"
        )


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when ``mask`` satisfies ``n:m`` along K (see ``check_nm``)."""
    try:
        check_nm(mask, n, m)
    except PatternError:
        return False
    return True


def check_channel(mask: torch.Tensor) -> torch.Tensor:
    """Raise ``PatternError`` unless each output channel is all kept or all pruned.

    Returns the ``[out]`` channel mask.
    """
    mat = as_matrix(mask)
    kept = mat.all(dim=1)
    dropped = ~mat.any(dim=1)
    partial = ~(kept | dropped)
    if bool(partial.any()):
        r = int(partial.nonzero()[0])
        raise PatternError(f"mask is not a channel mask: output channel {r} is partly kept ({int(mat[r].sum())} of {mat.shape[1]})")
    return kept


def sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned (False) entries; 0.0 for an empty mask."""
    numel = mask.numel()
    return 0.0 if numel == 0 else 1.0 - float(mask.sum()) / numel
