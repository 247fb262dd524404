"""Backends for the unstructured format: the pure-torch reference and the Triton spmm kernel.

* REFERENCE linear: ``spmm_ref`` on the packed tensors (decodes W on every call: the oracle and the
  always-available fallback, not a fast path; DENSE is the fast dense one).
* REFERENCE conv2d: decode the packed weight on every call, then ``F.conv2d``.
* TRITON_SPMM linear: ``kernels/spmm.py`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.base import PackedWeight
from ..formats.unstructured import UnstructuredWeight
from .registry import Backend, BackendImpl, ConvParams, conv_why_not, linear_why_not, register, triton_why_not

KINDS = ("unstructured",)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    reason = triton_why_not(x)
    if reason is not None:
        return reason
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


def _triton_linear(p: UnstructuredWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from ..kernels.spmm import spmm

    return spmm(x, p.bitmap, p.values, p.tile_offsets, p.n, bias)


register(BackendImpl(Backend.REFERENCE, "linear", KINDS, linear_why_not, _identity, _ref_linear,
                     differentiable=True))
register(BackendImpl(Backend.REFERENCE, "conv2d", KINDS, conv_why_not, _identity, _ref_conv,
                     differentiable=True))
register(BackendImpl(Backend.TRITON_SPMM, "linear", KINDS, _triton_why_not, _identity, _triton_linear))
