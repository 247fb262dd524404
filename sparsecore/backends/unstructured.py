"""Backends for the unstructured format: the pure-torch reference and the Triton spmm kernel.

* REFERENCE linear: ``spmm_ref`` on the packed tensors (decodes W on every call: the oracle and the
  always-available fallback, not a fast path; DENSE is the fast dense one).
* REFERENCE conv2d: decode the packed weight on every call, then ``F.conv2d``.
* TRITON_SPMM linear: ``kernels/spmm.py`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
* TRITON_SELL linear: ``kernels/sell_matmul.py`` on a sliced-ELL copy built once in ``prepare``
  (``sparsecore.formats.sell``): work per kept value, for decode batches at high sparsity; K <= 65536.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.base import PackedWeight
from ..formats.unstructured import UnstructuredWeight
from .registry import BackendImpl, ConvParams, conv_why_not, linear_why_not, register

KINDS = ("unstructured",)
REFERENCE, TRITON_SPMM, TRITON_SELL = "reference", "triton_spmm", "triton_sell"
_TRITON = frozenset({"triton"})
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if x.dtype not in _TRITON_DTYPES:
        return f"Triton spmm runs float16/bfloat16/float32, input is {x.dtype}"
    return linear_why_not(packed, x)


def _identity(packed: PackedWeight) -> UnstructuredWeight:
    assert isinstance(packed, UnstructuredWeight), type(packed)
    return packed


def _ref_linear(p: UnstructuredWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from ..kernels.spmm import spmm_ref  # imported on use: the kernel module imports Triton

    return spmm_ref(x, p.bitmap, p.values, p.tile_offsets, p.n, bias)


def _ref_conv(p: UnstructuredWeight, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    return F.conv2d(x, p.to_dense(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _triton_prepare(p: PackedWeight) -> tuple:
    from ..kernels.spmm import check_packed, spmm_prechecked  # imported on use: the kernel module imports Triton

    p = _identity(p)
    check_packed(p.bitmap, p.values, p.tile_offsets, p.n, p.shape[1])  # once, so that each call skips it
    return spmm_prechecked, p.bitmap, p.values, p.tile_offsets, p.n, p.shape[1]


def _triton_linear(state: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn, bitmap, values, tile_offsets, n, k = state  # resolved in prepare: no import or lookups per call
    return fn(x, bitmap, values, tile_offsets, n, k, bias)


register(BackendImpl(REFERENCE, "linear", KINDS, linear_why_not, _identity, _ref_linear,
                     differentiable=True, plannable=False))
register(BackendImpl(REFERENCE, "conv2d", KINDS, conv_why_not, _identity, _ref_conv,
                     differentiable=True, plannable=False))
register(BackendImpl(TRITON_SPMM, "linear", KINDS, _triton_why_not, _triton_prepare, _triton_linear, needs=_TRITON))


def _sell_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    from ..formats.sell import MAX_K

    reason = _triton_why_not(packed, x)
    if reason is None and len(packed.shape) == 2 and packed.shape[1] > MAX_K:
        reason = f"triton_sell stores 16-bit columns: K must be <= {MAX_K}, got {packed.shape[1]}"
    return reason


def _sell_prepare(p: PackedWeight) -> tuple:
    from ..formats.sell import pack_sell
    from ..kernels.sell_matmul import check_layout, sell_matmul

    p = _identity(p)
    layout = pack_sell(p.to_dense(), p.mask())  # once per device/dtype: the module drops it on .to()
    check_layout(layout)
    return sell_matmul, layout


def _sell_linear(state: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn, layout = state
    return fn(x, layout, bias)


register(BackendImpl(TRITON_SELL, "linear", KINDS, _sell_why_not, _sell_prepare, _sell_linear, needs=_TRITON))
