"""Native CPU backends (``kernels/cpu``): C++ kernels built on first use, one ISA path chosen per layer.

* CPU_BITMAP ``linear`` on ``unstructured``: the row-major bitmap layout derived once in ``prepare`` from
  the tiled bitmap (work per dense element, fewest bytes below ~85% sparsity).
* CPU_COLUMNS ``linear`` on ``unstructured``: per-row uint16 column indices (work per kept value: the faster
  one at high sparsity); K <= 65536.
* CPU_NM ``linear`` on ``nm``: the stored N:M values and positions, read as they are (no prepared copy).

Both unstructured backends derive their layouts from one bitmap layout per packed weight (shared values),
and either can rebuild the weight (``unpack``): a layer whose plan runs only these backends holds their
layouts and drops its packed buffers (``sparsecore.modules``).

The planner times them against dense; none is ever picked without being measured faster. The ISA path
(``avx512``, ``avx2``, ``portable``) is the widest the CPU runs, or ``SPARSECORE_CPU_ISA``, read when the
layer is prepared. A missing compiler or a failed build makes ``why_not`` return the reason: the planner
skips the backend, and a forced one raises ``BackendUnavailable``.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..formats.base import PackedWeight
from .registry import BackendImpl, compiler_why_not, linear_why_not, register

CPU_BITMAP = "cpu_bitmap"
CPU_COLUMNS = "cpu_columns"
CPU_NM = "cpu_nm"
_NEEDS = frozenset({"compiler"})
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"native CPU kernels need a CPU tensor, input is on {x.device}"
    if packed.dtype not in _DTYPES:
        return f"native CPU kernels run float32/bfloat16/float16, weight is {packed.dtype}"
    reason = linear_why_not(packed, x) or compiler_why_not(x)
    if reason is not None:
        return reason
    from ..kernels import cpu  # imported on use; building happens here, once per process

    reason = cpu.why_unavailable()
    if reason is None:
        try:
            cpu.default_isa()
        except (ValueError, cpu.CpuKernelsUnavailable) as e:
            reason = str(e)
    return reason


def _columns_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    from ..kernels.cpu import MAX_COLUMN_K

    if len(packed.shape) == 2 and packed.shape[1] > MAX_COLUMN_K:
        return f"{CPU_COLUMNS} stores 16-bit columns: K must be <= {MAX_COLUMN_K}, got {packed.shape[1]}"
    return _why_not(packed, x)


# The bitmap layout of each packed weight while some prepared state holds it (weak on both sides), shared by
# both unstructured backends: a layer planned to run both (say cpu_bitmap at M = 1, cpu_columns above)
# holds one copy of the values, not two. Both states are (kernel, layout, isa, the bitmap layout they share).
_ROWS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _rows_layout(p: Any) -> Any:
    from ..kernels import cpu

    hit = _ROWS.get(id(p))
    rows = hit[1]() if hit is not None and hit[0]() is p else None
    if rows is None:
        rows = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
        _remember(p, rows)
    return rows


def _remember(p: Any, rows: Any) -> None:
    _ROWS[id(p)] = (weakref.ref(p), weakref.ref(rows))
    weakref.finalize(p, _ROWS.pop, id(p), None)


def _adopt(state: tuple, p: Any) -> None:  # p was rebuilt from this state: its bitmap layout is the state's
    _remember(p, state[3])


def _bitmap_prepare(p: Any) -> tuple:
    from ..kernels import cpu

    rows = _rows_layout(p)
    return cpu.bitmap_linear, rows, cpu.default_isa(), rows


def _columns_prepare(p: Any) -> tuple:
    from ..kernels import cpu

    rows = _rows_layout(p)
    return cpu.columns_linear, cpu.column_layout_from(rows), cpu.default_isa(), rows


def _bitmap_unpack(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import cpu

    return cpu.bitmap_dense(state[1])


def _columns_unpack(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import cpu

    return cpu.column_dense(state[1])


def _layout_linear(state: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn, layout, isa = state[:3]  # resolved in prepare: no import or lookups per call
    return fn(x, layout, bias, isa)


def _nm_prepare(p: Any) -> tuple:
    from ..kernels import cpu

    return cpu.nm_linear, p.values.contiguous(), p.positions.contiguous(), p.n, p.m, cpu.default_isa()


def _nm_linear(state: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn, values, positions, n, m, isa = state
    return fn(x, values, positions, n, m, bias, isa)


register(BackendImpl(CPU_BITMAP, "linear", ("unstructured",), _why_not, _bitmap_prepare, _layout_linear, needs=_NEEDS,
                     unpack=_bitmap_unpack, adopt=_adopt))
register(BackendImpl(CPU_COLUMNS, "linear", ("unstructured",), _columns_why_not, _columns_prepare, _layout_linear,
                     needs=_NEEDS, unpack=_columns_unpack, adopt=_adopt))
register(BackendImpl(CPU_NM, "linear", ("nm",), _why_not, _nm_prepare, _nm_linear, needs=_NEEDS))
