"""Unstructured format: tiled bitmap plus packed values, streamed tile by tile by ``kernels/spmm.py``.

Why this layout (bytes per dense element, fp16, ``s`` = sparsity):

* tiled bitmap + values: ``1/8 + 2 (1 - s)`` -> 1.125 B at 50%, 0.725 B at 70%, 0.325 B at 90%,
  0.225 B at 95% (dense: 2 B). A per-tile int32 offset adds ``4 / (tile_n * tile_k)`` (0.001 B with
  the default 32 x 128 tiles).
* CSR with int32 column indices: ``6 (1 - s)`` -> 3 B at 50% (worse than dense), 0.6 B at 90%.
* CSR with int16 in-tile columns: ``4 (1 - s)`` -> 2 B at 50% (no gain), 0.4 B at 90%.

The bitmap wins on bytes at every sparsity below 97% and is the only one that beats dense at 50%: a
kernel program reads one contiguous bitmap block and one contiguous run of values per tile and finds each
value's slot on chip (a popcount of the bits before it in its 32-bit word, plus a scan over the tile's
words). That costs work per *dense* element (``kernels/spmm.py``'s decode loop; counts in
``bench/results/ptx_counts_sm90_triton*.md``), so at high sparsity the TRITON_SELL backend (``sparsecore.formats.sell``), which trades some bytes
for work per kept value, is the faster decode. Files always store this format.

Tiling. The ``[N, K]`` matrix view (``masks.as_matrix``: Conv2d K is ordered (kh, kw, C_in)) is padded
with pruned entries to ``[TN * tile_n, TK * tile_k]``, ``TN = ceil(N / tile_n)``,
``TK = ceil(K / tile_k)``, and cut into ``TN x TK`` tiles of ``tile_n x tile_k``. Tiles are numbered
row-major, ``tile = i * TK + j`` (tile row ``i`` covers rows ``i*tile_n ..``, tile column ``j`` covers
K positions ``j*tile_k ..``), so one output block's tiles are contiguous in memory.

Exact byte layout (little-endian, contiguous):

* ``bitmap``: int32 ``[TN, TK, tile_n, tile_k // 32]``. Entry ``(r, c)`` of tile ``(i, j)`` is bit
  ``c % 32`` (least significant first) of word ``bitmap[i, j, r, c // 32]``; 1 = kept. Bits of padding
  positions (row >= N or column >= K) are 0. Bytes: ``TN * TK * tile_n * tile_k / 8``.
* ``values``: weight dtype ``[nnz]``: kept values tile by tile (row-major tile order), inside a tile
  row by row, inside a row by increasing column. ``-0.0`` is a kept value like any other.
  Bytes: ``nnz * itemsize``.
* ``tile_offsets``: int32 ``[TN * TK + 1]``: ``tile_offsets[t]`` is the index in ``values`` of tile
  ``t``'s first value; ``tile_offsets[0] == 0``, ``tile_offsets[-1] == nnz``, and
  ``tile_offsets[t + 1] - tile_offsets[t]`` is the popcount of tile ``t``'s bitmap.
  Bytes: ``4 * (TN * TK + 1)``.

``nbytes = TN*TK*tile_n*tile_k/8 + nnz*itemsize + 4*(TN*TK + 1)``. Example: ``[4096, 4096]`` fp16 at
90% with 32 x 128 tiles: 2,097,152 + 3,355,442 + 16,388 bytes = 0.326 B per dense element.
"""
from __future__ import annotations

import math

from typing import Any

import torch

from ..intmath import cdiv
from ..masks import as_matrix, from_matrix
from .base import (FormatError, PackedWeight, check_weight_and_mask, dtype_from_name, dtype_name, expect_tensor,
                   meta_shape, register_format, expect_state)

__all__ = ["UnstructuredWeight", "TILE_N_CHOICES", "TILE_K_CHOICES", "MAX_TILE_ELEMS", "unpack_bits",
           "tiles_to_matrix", "decode_matrix"]

# Powers of two (Triton block shapes); tile_n >= 16 so the prefill path can use tl.dot. A tile is expanded
# in registers (and staged in shared memory for tl.dot), so tile_n * tile_k is capped at 8192 entries.
TILE_N_CHOICES = (16, 32, 64, 128)
TILE_K_CHOICES = (32, 64, 128, 256, 512, 1024)
MAX_TILE_ELEMS = 8192
_INT32_MAX = 2**31 - 1


def _check_tiles(tile_n: Any, tile_k: Any, exc: type[Exception]) -> None:
    if not (isinstance(tile_n, int) and tile_n in TILE_N_CHOICES):
        raise exc(f"tile_n must be one of {TILE_N_CHOICES}, got {tile_n!r}")
    if not (isinstance(tile_k, int) and tile_k in TILE_K_CHOICES):
        raise exc(f"tile_k must be one of {TILE_K_CHOICES}, got {tile_k!r}")
    if tile_n * tile_k > MAX_TILE_ELEMS:
        raise exc(f"tile_n * tile_k must be <= {MAX_TILE_ELEMS}, got {tile_n} * {tile_k}")


def unpack_bits(bitmap: torch.Tensor) -> torch.Tensor:
    """Bool tiles ``[TN, TK, tile_n, tile_k]`` from an int32 ``bitmap [TN, TK, tile_n, tile_k // 32]``."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmap.device)
    bits = torch.empty(bitmap.shape + (32,), dtype=torch.bool, device=bitmap.device)
    # Chunks of tile rows bound the int32 temporary (4 bytes per dense element) to about 64 MiB.
    step = max(1, (1 << 24) // max(1, bitmap[:1].numel() * 32))
    for i in range(0, bitmap.shape[0], step):
        bits[i:i + step] = ((bitmap[i:i + step, ..., None] >> shifts) & 1) != 0
    return bits.reshape(bitmap.shape[:-1] + (bitmap.shape[-1] * 32,))


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_bits``: bool ``[..., tile_k]`` -> int32 ``[..., tile_k // 32]``."""
    words = bits.reshape(bits.shape[:-1] + (bits.shape[-1] // 32, 32)).to(torch.int64)
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    packed = (words << shifts).sum(-1)
    # Two's complement by hand so bit 31 becomes the int32 sign bit without relying on cast overflow.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def tiles_to_matrix(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[TN, TK, tile_n, tile_k]`` tiles -> the cropped ``[n, k]`` matrix."""
    tn, tk, tile_n, tile_k = tiles.shape
    return tiles.permute(0, 2, 1, 3).reshape(tn * tile_n, tk * tile_k)[:n, :k]


def decode_matrix(bitmap: torch.Tensor, values: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Dense ``[n, k]`` matrix (pruned = +0.0) from the packed ``bitmap`` and ``values`` (pure torch)."""
    bits = unpack_bits(bitmap)
    # masked_scatter fills the kept slots in row-major order: exactly the values' storage order.
    tiles = torch.zeros(bits.shape, dtype=values.dtype, device=values.device).masked_scatter_(bits, values)
    return tiles_to_matrix(tiles, n, k)


@register_format
class UnstructuredWeight(PackedWeight):
    __doc__ = __doc__  # the module docstring is the format's byte-layout specification
    kind = "unstructured"
    version = 1
    _nonzeros_from_values = True  # values: every kept entry, plus +0.0 fillers at most

    def __init__(self, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor,
                 shape: tuple[int, ...], tile_n: int, tile_k: int):
        self.bitmap, self.values, self.tile_offsets = bitmap, values, tile_offsets
        self.shape = tuple(shape)
        self.dtype = values.dtype
        self.tile_n, self.tile_k = tile_n, tile_k

    @property
    def n(self) -> int:
        """Rows of the ``[N, K]`` matrix view (output features / channels)."""
        return self.shape[0]

    @property
    def k(self) -> int:
        """Columns of the ``[N, K]`` matrix view (in, or kh * kw * C_in)."""
        k = 1
        for s in self.shape[1:]:
            k *= s
        return k

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, *, tile_n: int = 32,
                   tile_k: int = 128) -> "UnstructuredWeight":
        """Pack ``weight`` ``[out, in]`` or ``[C_out, C_in, kh, kw]`` under a bool ``mask`` of its shape.

        ``tile_n`` x ``tile_k`` is the tile the kernel streams. The default 32 x 128 costs the fewest sm_90
        instructions per element over M = 1-16 among the tile choices (``bench/results/ptx_counts_sm90_triton*.md``).

        >>> w = torch.randn(8, 40); p = UnstructuredWeight.from_dense(w, w.abs() > 1)
        >>> torch.equal(p.to_dense(), torch.where(w.abs() > 1, w, 0))
        True
        """
        _check_tiles(tile_n, tile_k, ValueError)
        check_weight_and_mask(weight, mask)
        w, m = as_matrix(weight), as_matrix(mask)
        n, k = w.shape
        tn, tk = cdiv(n, tile_n), cdiv(k, tile_k)
        if int(m.sum()) > _INT32_MAX:
            raise ValueError(f"{int(m.sum())} kept values overflow the format's int32 tile offsets")
        pad_w = torch.zeros(tn * tile_n, tk * tile_k, dtype=w.dtype, device=w.device)
        pad_m = torch.zeros(tn * tile_n, tk * tile_k, dtype=torch.bool, device=w.device)
        pad_w[:n, :k], pad_m[:n, :k] = w, m
        w_tiles = pad_w.reshape(tn, tile_n, tk, tile_k).permute(0, 2, 1, 3).contiguous()
        m_tiles = pad_m.reshape(tn, tile_n, tk, tile_k).permute(0, 2, 1, 3).contiguous()
        values = w_tiles[m_tiles].contiguous()
        counts = m_tiles.sum(dim=(2, 3)).reshape(-1)
        offsets = torch.zeros(tn * tk + 1, dtype=torch.int64, device=w.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(_pack_bits(m_tiles), values, offsets.to(torch.int32), tuple(weight.shape), tile_n, tile_k)

    def to_dense(self) -> torch.Tensor:
        return from_matrix(decode_matrix(self.bitmap, self.values, self.n, self.k), self.shape).contiguous()

    def mask(self) -> torch.Tensor:
        """The bool keep-mask of ``self.shape``."""
        return from_matrix(tiles_to_matrix(unpack_bits(self.bitmap), self.n, self.k), self.shape).contiguous()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"bitmap": self.bitmap, "values": self.values, "tile_offsets": self.tile_offsets}
        meta = {"kind": self.kind, "version": self.version, "shape": list(self.shape),
                "dtype": dtype_name(self.dtype), "tile_n": self.tile_n, "tile_k": self.tile_k}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "UnstructuredWeight":
        expect_state(cls, tensors, meta, {"bitmap", "values", "tile_offsets"})
        shape = meta_shape(meta)
        dtype = dtype_from_name(meta.get("dtype"))
        tile_n, tile_k = meta.get("tile_n"), meta.get("tile_k")
        _check_tiles(tile_n, tile_k, FormatError)
        n, k = shape[0], math.prod(shape[1:])
        tn, tk = cdiv(n, tile_n), cdiv(k, tile_k)
        bitmap = expect_tensor(tensors, "bitmap", torch.int32, (tn, tk, tile_n, tile_k // 32))
        offsets = expect_tensor(tensors, "tile_offsets", torch.int32, (tn * tk + 1,))
        values = expect_tensor(tensors, "values", dtype, (tensors["values"].numel(),))

        bits = unpack_bits(bitmap)
        pad = torch.ones(tn * tile_n, tk * tile_k, dtype=torch.bool, device=bitmap.device)
        pad[:n, :k] = False
        if bool((bits & pad.reshape(tn, tile_n, tk, tile_k).permute(0, 2, 1, 3)).any()):
            raise FormatError(f"bitmap sets bits outside the {n} x {k} matrix (padding must be 0)")
        counts = bits.sum(dim=(2, 3)).reshape(-1).to(torch.int64)
        expected = torch.zeros(tn * tk + 1, dtype=torch.int64, device=bitmap.device)
        expected[1:] = torch.cumsum(counts, 0)
        if not torch.equal(offsets.to(torch.int64), expected.to(offsets.device)):
            bad = int((offsets.to(torch.int64) != expected.to(offsets.device)).nonzero()[0])
            raise FormatError(f"tile_offsets[{bad}] = {int(offsets[bad])} disagrees with the bitmap popcounts "
                              f"(expected {int(expected[bad])})")
        if values.numel() != int(expected[-1]):
            raise FormatError(f"values has {values.numel()} entries, bitmap keeps {int(expected[-1])}")
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise FormatError("values contain NaN or Inf; packed weights are always finite")
        return cls(bitmap.contiguous(), values.contiguous(), offsets.contiguous(), shape, tile_n, tile_k)
