"""N:M format: the ``n`` slots of every group of ``m`` along K, plus their in-group positions.

Byte layout for a weight whose ``[out, K]`` matrix view (``masks.as_matrix``) has ``G = K / m`` groups
per row and ``S = G * n`` slots per row, ``b = log2(m)`` bits per position (2 for m=4, 3 for m=8):

* ``values``: weight dtype ``[out, S]``, row-major. Slot ``s = g * n + j`` (``j < n``) holds the value at
  dense column ``g * m + pos[s]``.
* ``positions``: uint8 ``[out, R]`` with ``R = ceil(S * b / 8)``. Each row is a little-endian bit
  stream: bit ``t`` of ``pos[s]`` is bit ``(s*b + t) % 8`` of byte ``(s*b + t) // 8``. For 2:4 that is
  two slots (one group) per nibble: byte ``i`` = ``pos[4i] | pos[4i+1] << 2 | pos[4i+2] << 4 |
  pos[4i+3] << 6``. For m=8 a 3-bit position may straddle two bytes. Bits past the last slot are 0.

Canonical form (checked by ``from_state``): inside a group the ``n`` positions are strictly increasing.
A group that keeps fewer than ``n`` entries fills its spare slots with +0.0 at the lowest unused
positions, so every group has ``n`` distinct positions and ``to_dense`` is a plain scatter.

Bytes: ``out * (S * itemsize + ceil(S * b / 8))``. fp16 2:4: ``S = K/2`` values of 2 B plus ``K/8``
bytes of positions = 1.125 B per dense element (dense: 2 B), the 1.78x ceiling of a memory-bound kernel.
fp16 4:8: 1 + 0.1875 = 1.1875 B; fp16 1:4 and 2:8: 0.5625 and 0.5 + 0.09375 B.

Conv2d weights are stored through their matrix view (K ordered (kh, kw, C_in)); ``shape`` keeps the
original 4-D shape.
"""
from __future__ import annotations

from typing import Any

import torch

from ..masks import PatternError, as_matrix, check_nm, from_matrix
from .base import (FormatError, PackedWeight, check_weight_and_mask, dtype_from_name, dtype_name, expect_tensor,
                   meta_shape, register_format, expect_state)

__all__ = ["NMWeight", "pack_positions", "unpack_positions", "position_bits", "positions_row_bytes",
           "check_nm_params"]

_BITS = {4: 2, 8: 3}  # the storable group sizes m and their bits per position, log2(m)


def check_nm_params(n: Any, m: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``m`` in {4, 8} and ``0 < n < m`` are ints: the one N:M rule for configs, this
    format and the N:M kernel (mask selection alone, ``sparsecore.masks.keep_n_of_m``, takes any ``n <= m``)."""
    ok = (isinstance(n, int) and isinstance(m, int) and not isinstance(n, bool) and not isinstance(m, bool)
          and m in _BITS and 0 < n < m)
    if not ok:
        raise error(f"N:M format needs integers m in (4, 8) and 0 < n < m, got n={n!r}, m={m!r}")


def position_bits(m: int) -> int:
    """Bits per stored position: log2(m)."""
    return _BITS[m]


def _row_bytes(slots: int, bits: int) -> int:
    return (slots * bits + 7) // 8


def positions_row_bytes(slots: int, m: int) -> int:
    """Bytes of one row of packed positions: ``ceil(slots * log2(m) / 8)``."""
    return _row_bytes(slots, _BITS[m])


def pack_positions(pos: torch.Tensor, m: int) -> torch.Tensor:
    """Pack in-group positions ``[out, S]`` (ints in [0, m)) into the uint8 ``[out, R]`` bit stream."""
    bits = position_bits(m)
    out, slots = pos.shape
    nbytes = _row_bytes(slots, bits)
    shifts = torch.arange(bits, device=pos.device)
    stream = ((pos.to(torch.int64)[..., None] >> shifts) & 1).reshape(out, slots * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - slots * bits))
    weights = 1 << torch.arange(8, device=pos.device)
    return (stream.reshape(out, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def _unpack_stream(packed: torch.Tensor, slots: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions int64 [out, S], padding bits [out, R*8 - S*b])."""
    bits = position_bits(m)
    out = packed.shape[0]
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1  # uint8 bits
    stream = stream.reshape(out, -1)
    used = stream[:, : slots * bits].reshape(out, slots, bits).to(torch.int32)
    pos = (used << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1, dtype=torch.int64)
    return pos, stream[:, slots * bits:]


def unpack_positions(packed: torch.Tensor, slots: int, m: int) -> torch.Tensor:
    """Inverse of ``pack_positions``: uint8 ``[out, R]`` -> int64 positions ``[out, S]``."""
    return _unpack_stream(packed, slots, m)[0]


@register_format
class NMWeight(PackedWeight):
    """N:M packed weight; see the module docstring for the byte layout.

    >>> w = torch.randn(8, 16); mask = keep_n_of_m(w.abs(), 2, 4)
    >>> p = NMWeight.from_dense(w, mask, n=2, m=4)
    >>> torch.equal(p.to_dense(), torch.where(mask, w, 0))
    True
    """

    kind = "nm"
    version = 1
    _nonzeros_from_values = True  # values: every kept entry, plus +0.0 fillers at most
    mask_rule = "nm"

    @classmethod
    def check_config(cls, config: Any) -> None:
        check_nm_params(config.n, config.m)
        if config.scope != "layer":
            raise ValueError("N:M pruning is per group; scope must be 'layer'")

    @classmethod
    def pack_params(cls, config: Any) -> dict[str, Any]:
        return {"n": config.n, "m": config.m}

    @classmethod
    def check_mask_pattern(cls, mask: torch.Tensor, config: Any) -> None:
        check_nm(mask, config.n, config.m)

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, n: int, m: int, shape: tuple[int, ...]):
        self.values, self.positions = values, positions
        self.n, self.m = n, m
        self.shape = tuple(shape)
        self.dtype = values.dtype

    # [out, K] matrix view sizes
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        """Length of the reduction dimension K of the ``[out, K]`` view."""
        return self.values.shape[1] * self.m // self.n

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, n: int = 2, m: int = 4, **params: Any) -> "NMWeight":
        """Pack ``weight`` (``[out, in]`` or ``[C_out, C_in, kh, kw]``) under an ``n:m`` bool ``mask``.

        Groups with fewer than ``n`` kept entries are allowed. Raises ``PatternError`` when K is not a
        multiple of ``m`` or a group keeps more than ``n``.
        """
        if params:
            raise TypeError(f"NMWeight.from_dense takes n and m only, got {sorted(params)}")
        check_nm_params(n, m)
        check_weight_and_mask(weight, mask)
        w_mat, m_mat = as_matrix(weight), as_matrix(mask)
        out, k_dim = w_mat.shape
        if k_dim % m:
            raise PatternError(f"{n}:{m} needs K divisible by {m}; weight shape {tuple(weight.shape)} has K={k_dim}")
        check_nm(mask, n, m)
        groups = k_dim // m
        keep = m_mat.reshape(out, groups, m)
        ar = torch.arange(m, device=weight.device)
        # Kept positions sort first, then unused ones; the n smallest keys are the slots, re-sorted by position.
        key = torch.where(keep, ar, ar + m)
        pos = torch.sort(torch.sort(key, dim=-1).values[..., :n] % m, dim=-1).values  # [out, G, n]
        vals = torch.gather(w_mat.reshape(out, groups, m), -1, pos)
        vals = torch.where(torch.gather(keep, -1, pos), vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        slots = groups * n
        return cls(vals.reshape(out, slots).contiguous(), pack_positions(pos.reshape(out, slots), m), n, m,
                   tuple(weight.shape))

    def slot_positions(self) -> torch.Tensor:
        """In-group positions of every slot, int64 ``[out, S]``."""
        return unpack_positions(self.positions, self.values.shape[1], self.m)

    def to_dense(self) -> torch.Tensor:
        out, slots = self.values.shape
        groups = slots // self.n
        pos = self.slot_positions().reshape(out, groups, self.n)
        dense = torch.zeros(out, groups, self.m, dtype=self.dtype, device=self.values.device)
        dense.scatter_(-1, pos, self.values.reshape(out, groups, self.n))
        return from_matrix(dense.reshape(out, groups * self.m), self.shape)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"values": self.values, "positions": self.positions}
        return tensors, {"kind": self.kind, "version": self.version, "shape": list(self.shape),
                         "dtype": dtype_name(self.dtype), "n": self.n, "m": self.m}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "NMWeight":
        expect_state(cls, tensors, meta, {"values", "positions"})
        shape = meta_shape(meta)
        dtype = dtype_from_name(meta.get("dtype"))
        n, m = meta.get("n"), meta.get("m")
        check_nm_params(n, m, FormatError)
        out = shape[0]
        k_dim = shape[1] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
        if k_dim % m:
            raise FormatError(f"{n}:{m} needs K divisible by {m}; shape {shape} has K={k_dim}")
        slots = k_dim // m * n
        values = expect_tensor(tensors, "values", dtype, (out, slots))
        positions = expect_tensor(tensors, "positions", torch.uint8, (out, _row_bytes(slots, position_bits(m))))
        if values.device != positions.device:
            raise FormatError(f"values on {values.device} but positions on {positions.device}")
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise FormatError("values contain NaN or Inf")
        pos, pad = _unpack_stream(positions, slots, m)
        if bool(pad.any()):
            raise FormatError("positions have non-zero padding bits past the last slot")
        if n > 1 and pos.numel():
            grouped = pos.reshape(out, -1, n)
            bad = (grouped[..., 1:] <= grouped[..., :-1]).nonzero()
            if bad.numel():
                r, g = (int(v) for v in bad[0, :2])
                raise FormatError(f"positions in row {r}, group {g} are not strictly increasing: "
                                  f"{grouped[r, g].tolist()} (duplicate or unsorted)")
        return cls(values.contiguous(), positions.contiguous(), n, m, shape)

    # ---- PyTorch 2:4 interop -------------------------------------------------------------------------
    def _check_torch_24(self) -> None:
        if self.m != 4 or self.n > 2:
            raise ValueError(f"PyTorch semi-structured sparsity is 2:4; this weight is {self.n}:{self.m}")
        if len(self.shape) != 2:
            raise ValueError(f"PyTorch semi-structured sparsity takes 2-D weights, shape is {self.shape}")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"PyTorch 2:4 for floats needs float16/bfloat16 (float32 means 1:2 there), "
                            f"got {self.dtype}")

    def to_cutlass_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PyTorch's CUTLASS 2:4 pair ``(kept [out, K/2], meta int16)``; runs on CPU too.

        Uses ``torch.sparse._semi_structured_conversions`` (private) on the dense weight. PyTorch decides
        'kept' by ``value != 0``: a kept zero counts as pruned, which changes no product. Needs
        ``out % 32 == 0`` and ``K % 16 == 0``.
        """
        self._check_torch_24()
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
        return sparse_semi_structured_from_dense_cutlass(self.to_dense().contiguous())

    def to_torch_semi_structured(self, backend: str = "cusparselt") -> torch.Tensor:
        """``torch.sparse.SparseSemiStructuredTensor`` (CUDA only) for ``backend`` 'cusparselt' or 'cutlass'.

        Use as ``F.linear(x, w_sparse, bias)``. Raises PyTorch's error on unsupported devices/shapes.
        """
        self._check_torch_24()
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
        classes = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}
        if backend not in classes:
            raise ValueError(f"backend must be one of {sorted(classes)}, got {backend!r}")
        return classes[backend].from_dense(self.to_dense().contiguous())
