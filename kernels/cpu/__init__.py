"""Native CPU kernels for sparse linear layers: built on first use, cached, chosen per instruction set.

Ops (each with launcher + ``_ref`` in pure torch, and a torch operator ``sparsecore::cpu_*_linear`` registered in
C++ with a fake implementation, for torch.compile and autograd-enabled calls):

* ``bitmap_linear(x, layout, bias)``: ``y [M, N] = x [M, K] @ W^T (+ bias)`` with W in the row-major
  bitmap layout (``BitmapLayout``) that ``bitmap_layout`` derives once from the tiled unstructured format.
* ``nm_linear(x, values, positions, n, m, bias)``: the same with W in the stored N:M format, read as is.

Row-major bitmap layout, bytes per dense element at sparsity ``s`` (``e`` = 4 B fp32, 2 B bf16/fp16):
``words`` int64 ``[N, ceil(K / 64)]`` (bit ``c % 64`` of word ``c // 64`` = column ``c`` kept): 1/8 B;
``values`` in row order plus 16 elements of padding: ``e (1 - s)``; ``row_ptr`` int64 ``[N + 1]``: ``8 / K``.
fp32: 2.13 B at 50%, 1.33 B at 70%, 0.53 B at 90%, 0.33 B at 95% (dense 4 B). bf16: 1.13 / 0.73 / 0.33 / 0.23 B.
The tiled format's own bytes are the same (its per-tile offsets replace ``row_ptr``): the layout is a
reordering, derived in C++ from the bitmap words and values without a dense copy.
Column-index layout (``ColumnLayout``, for high sparsity: work per kept value): ``cols`` uint16 per kept
value plus the same ``values`` and ``row_ptr``: ``(e + 2)(1 - s) + 8 / K`` B; fp32 0.60 B at 90%, 0.30 B at 95%;
K <= 65536. ``column_layout_from`` derives it from a bitmap layout and shares that layout's ``values`` and
``row_ptr``: a layer running both holds ``(e + 2)(1 - s) + 1/8`` B per element in all, and once its plan runs
only these layouts it drops the packed form (``sparsecore.modules``): fp32 at 50%, 3.1 B against dense 4 B.
N:M reads ``values [N, K n / m]`` and the packed positions directly: fp32 2:4 is 2 + 1/8 B.

Instruction sets: ``avx512`` (expand-loads under bitmap bits, ``vpermt2ps`` over decoded 2:4 positions),
``avx2`` (table-driven expansion, 8-lane permutes), ``portable`` (scalar C++, the oracle of the other two).
The best one the CPU runs is the default; ``SPARSECORE_CPU_ISA=avx512|avx2|portable`` or the ``isa``
argument forces one. For ``M > 1`` x is packed once per call into tiles ``[K, mt]`` of ``mt`` activation
rows (16 on AVX2/portable; up to 128 on AVX-512, by 16x16 register transposes), so that one broadcast kept
value feeds ``mt / 16`` FMAs; on AVX-512 a tile's columns are swept in panels of at most 256 KiB, which stay
in L2 while every output feature re-reads them, and 16 output features at a time are transposed back into
``y``. Work items are (tile, chunk of output features), tile-major, shared out with ``at::parallel_for``
(``torch.set_num_threads`` applies); the threads pack a tile together when they first need it.

The extension is built (``kernels/cpu/_extension.py``: ``torch.utils.cpp_extension``, cached per sources, flags,
torch, Python and CPU features) on the first call that needs it, never at import. If it cannot be built,
``why_unavailable()`` says why and the callers raise ``CpuKernelsUnavailable``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from .._host import needs_op
from ._extension import X86, CpuKernelsUnavailable, build, isas, load_once, unavailable_reason

__all__ = ["CpuKernelsUnavailable", "BitmapLayout", "ISAS", "extension", "why_unavailable", "available_isas",
           "default_isa", "bitmap_layout", "bitmap_linear", "bitmap_linear_ref", "bitmap_dense", "ColumnLayout",
           "column_layout", "column_layout_from", "column_dense",
           "columns_linear", "columns_linear_ref", "MAX_COLUMN_K", "nm_linear", "nm_linear_ref",
           "DTYPES"]

ISAS = ("portable", "avx2", "avx512")          # plainest first; the index is the code the C++ side takes
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SOURCES = ("ops.cpp", "portable.cpp") + (("avx2.cpp", "avx512.cpp") if X86 else ())


def _build() -> ModuleType:
    mod = build("sparsecore_cpu", _SOURCES, ["common.h"])
    _register_fakes()
    return mod


def _register_fakes() -> None:
    """Shapes of the extension's operators (``sparsecore::cpu_*_linear``) for torch.compile's tracing."""
    def bitmap(x, words, values, row_ptr, bias, k, isa):
        return x.new_empty((x.shape[0], words.shape[0]))

    def columns(x, cols, values, row_ptr, bias, k, isa):
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))

    def nm(x, values, positions, n, m, bias, isa):
        return x.new_empty((x.shape[0], values.shape[0]))

    for name, fn in (("cpu_bitmap_linear", bitmap), ("cpu_columns_linear", columns), ("cpu_nm_linear", nm)):
        torch.library.register_fake(f"sparsecore::{name}", fn)


_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error", set once; "isas"


def extension() -> ModuleType:
    """The compiled extension (built on the first call, then cached); raises ``CpuKernelsUnavailable``."""
    return load_once(_state, _lock, _build, "the native CPU kernels")


def why_unavailable() -> Optional[str]:
    """``None`` if the extension builds (building it if needed), else the reason."""
    return unavailable_reason(extension)


def available_isas() -> tuple[str, ...]:
    """Instruction-set paths this CPU runs, plainest first (builds the extension)."""
    return isas(_state, extension)


def default_isa() -> str:
    """``SPARSECORE_CPU_ISA`` if set (must be one this CPU runs), else the widest available."""
    have = available_isas()
    forced = os.environ.get("SPARSECORE_CPU_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"SPARSECORE_CPU_ISA must be one of {ISAS}, got {forced!r}")
        if forced not in have:
            raise CpuKernelsUnavailable(f"SPARSECORE_CPU_ISA={forced} but this CPU runs only {have}")
        return forced
    return have[-1]


def _isa_code(isa: Optional[str]) -> int:
    isa = default_isa() if isa is None else isa
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa not in available_isas():
        raise CpuKernelsUnavailable(f"this CPU cannot run the {isa} path; it runs {available_isas()}")
    return ISAS.index(isa)


# ---- unstructured: row-major bitmap layout -------------------------------------------------------------
@dataclass(frozen=True)
class BitmapLayout:
    """Row-major bitmap layout of a ``[n, k]`` weight (see the module docstring for the bytes)."""

    words: torch.Tensor     # int64 [n, ceil(k / 64)]
    values: torch.Tensor    # [nnz + 16], weight dtype, row order
    row_ptr: torch.Tensor   # int64 [n + 1]
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.values, self.row_ptr))


def bitmap_layout(bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
                  k: int) -> BitmapLayout:
    """Derive the row-major layout from the tiled format's tensors (``UnstructuredWeight``), on CPU, once."""
    if values.dtype not in DTYPES:
        raise TypeError(f"CPU kernels run {DTYPES}, values are {values.dtype}")
    words, vals, row_ptr = extension().bitmap_layout(bitmap.contiguous(), values.contiguous(),
                                                     tile_offsets.contiguous(), n, k)
    return BitmapLayout(words, vals, row_ptr, n, k)


def _check_x(x: torch.Tensor, k: int, dtype: torch.dtype, n: int, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be a 2-D tensor [M, {k}], got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype != dtype or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU {dtype} tensor, got {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != dtype):
        raise ValueError(f"bias must be [{n}] {dtype}, got {tuple(bias.shape)} {bias.dtype}")


def bitmap_linear(x: torch.Tensor, layout: BitmapLayout, bias: Optional[torch.Tensor] = None,
                  isa: Optional[str] = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias)``, W as a ``BitmapLayout``; ``isa`` forces a path.

    >>> layout = bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)   # p: UnstructuredWeight
    >>> y = bitmap_linear(x, layout)                                          # == F.linear(x, p.to_dense())
    """
    _check_x(x, layout.k, layout.values.dtype, layout.n, bias)
    code = _isa_code(isa)
    if needs_op(x, bias):
        return torch.ops.sparsecore.cpu_bitmap_linear(x, layout.words, layout.values, layout.row_ptr, bias, layout.k,
                                                      code)
    return extension().bitmap_linear(x, layout.words, layout.values, layout.row_ptr, bias, layout.k, code)


def bitmap_dense(layout: BitmapLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [n, k] in the values' dtype, kept mask [n, k])`` of a bitmap layout (kept zeros stay kept)."""
    shifts = torch.arange(64, dtype=torch.int64)
    bits = ((layout.words[..., None] >> shifts) & 1).bool().reshape(layout.n, -1)[:, : layout.k]
    nnz = int(layout.row_ptr[-1])
    return torch.zeros(bits.shape, dtype=layout.values.dtype).masked_scatter_(bits, layout.values[:nnz]), bits


def bitmap_linear_ref(x: torch.Tensor, layout: BitmapLayout, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure torch on the same layout: unpack the words, scatter the values, one fp32 matmul."""
    w = bitmap_dense(layout)[0].float()
    y = x.float() @ w.t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# ---- unstructured: column-index layout (high sparsity) -------------------------------------------------
@dataclass(frozen=True)
class ColumnLayout:
    """Per-row uint16 column indices (int16 storage) and values of a ``[n, k]`` weight, ``k <= 65536``."""

    cols: torch.Tensor      # int16 [nnz + 16] (read as uint16), increasing within a row
    values: torch.Tensor    # [nnz + 16], weight dtype, row order
    row_ptr: torch.Tensor   # int64 [n + 1]
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cols, self.values, self.row_ptr))


MAX_COLUMN_K = 65536


def column_layout(bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
                  k: int) -> ColumnLayout:
    """Derive the column-index layout from the tiled format's tensors (through a temporary bitmap layout)."""
    if k > MAX_COLUMN_K:
        raise ValueError(f"the column-index layout stores 16-bit columns: K must be <= {MAX_COLUMN_K}, got {k}")
    return column_layout_from(bitmap_layout(bitmap, values, tile_offsets, n, k))


def column_layout_from(rows: BitmapLayout) -> ColumnLayout:
    """The column-index layout of a bitmap layout, sharing its ``values`` and ``row_ptr`` tensors."""
    if rows.k > MAX_COLUMN_K:
        raise ValueError(f"the column-index layout stores 16-bit columns: K must be <= {MAX_COLUMN_K}, got {rows.k}")
    return ColumnLayout(extension().column_layout(rows.words, rows.row_ptr, rows.k), rows.values, rows.row_ptr,
                        rows.n, rows.k)


def column_dense(layout: ColumnLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [n, k] in the values' dtype, kept mask [n, k])`` of a column-index layout."""
    counts = layout.row_ptr[1:] - layout.row_ptr[:-1]
    nnz = int(layout.row_ptr[-1])
    rows = torch.repeat_interleave(torch.arange(layout.n), counts)
    cols = layout.cols[:nnz].to(torch.int64) & 0xFFFF
    w = torch.zeros(layout.n, layout.k, dtype=layout.values.dtype)
    w[rows, cols] = layout.values[:nnz]
    mask = torch.zeros(layout.n, layout.k, dtype=torch.bool)
    mask[rows, cols] = True
    return w, mask


def columns_linear(x: torch.Tensor, layout: ColumnLayout, bias: Optional[torch.Tensor] = None,
                   isa: Optional[str] = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias)``, W as a ``ColumnLayout``; ``isa`` forces a path.

    >>> layout = column_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)   # p: UnstructuredWeight
    >>> y = columns_linear(x, layout)                                         # == F.linear(x, p.to_dense())
    """
    _check_x(x, layout.k, layout.values.dtype, layout.n, bias)
    code = _isa_code(isa)
    if needs_op(x, bias):
        return torch.ops.sparsecore.cpu_columns_linear(x, layout.cols, layout.values, layout.row_ptr, bias, layout.k,
                                                       code)
    return extension().columns_linear(x, layout.cols, layout.values, layout.row_ptr, bias, layout.k, code)


def columns_linear_ref(x: torch.Tensor, layout: ColumnLayout, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure torch on the same layout: scatter the values at (row, column), one fp32 matmul."""
    w = column_dense(layout)[0].float()
    y = x.float() @ w.t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# ---- N:M: the stored format ---------------------------------------------------------------------------
def nm_linear(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
              bias: Optional[torch.Tensor] = None, isa: Optional[str] = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias)``, W as N:M ``values [N, K n / m]`` and packed ``positions``.

    >>> y = nm_linear(x, p.values, p.positions, p.n, p.m)   # p: NMWeight; == F.linear(x, p.to_dense())
    """
    if values.dim() != 2 or values.dtype not in DTYPES or not values.is_contiguous():
        raise ValueError(f"values must be a contiguous 2-D tensor of {DTYPES}, got {values.dtype} "
                         f"{tuple(values.shape)}")
    if not (isinstance(m, int) and m in (4, 8) and isinstance(n, int) and 0 < n < m and values.shape[1] % n == 0):
        raise ValueError(f"N:M needs m in (4, 8), 0 < n < m and n dividing {values.shape[1]} slots; got {n}:{m}")
    _check_x(x, values.shape[1] // n * m, values.dtype, values.shape[0], bias)
    code = _isa_code(isa)
    if needs_op(x, bias):
        return torch.ops.sparsecore.cpu_nm_linear(x, values, positions, n, m, bias, code)
    return extension().nm_linear(x, values, positions, n, m, bias, code)


def nm_linear_ref(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure torch: decode the positions, scatter the values into a dense W, one fp32 matmul."""
    from sparsecore.formats.nm import unpack_positions

    rows, slots = values.shape
    pos = unpack_positions(positions, slots, m).reshape(rows, slots // n, n)
    w = torch.zeros(rows, slots // n, m, dtype=torch.float32)
    w.scatter_(-1, pos, values.float().reshape(rows, slots // n, n))
    y = x.float() @ w.reshape(rows, -1).t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
