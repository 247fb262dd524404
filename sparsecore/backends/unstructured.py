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
from .registry import Backend, BackendImpl, ConvParams, register, triton_why_not

KINDS = ("unstructured",)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _same_place(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if x.dtype != packed.dtype:
        return f"input dtype {x.dtype} differs from the packed weight's {packed.dtype}"
    if x.device != packed.device:
        return f"input is on {x.device}, packed weight on {packed.device}"
    return None


def _linear_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if len(packed.shape) != 2:
        return f"linear needs a 2-D weight, packed weight has shape {tuple(packed.shape)}"
    return _same_place(packed, x)


def _conv_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if len(packed.shape) != 4:
        return f"conv2d needs a 4-D weight, packed weight has shape {tuple(packed.shape)}"
    return _same_place(packed, x)


def _triton_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    reason = triton_why_not(x)
    if reason is not None:
        return reason
    if x.dtype not in _TRITON_DTYPES:
        return f"Triton spmm runs float16/bfloat16/float32, input is {x.dtype}"
    return _linear_why_not(packed, x)


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


register(BackendImpl(Backend.REFERENCE, "linear", KINDS, _linear_why_not, _identity, _ref_linear,
                     differentiable=True))
register(BackendImpl(Backend.REFERENCE, "conv2d", KINDS, _conv_why_not, _identity, _ref_conv,
                     differentiable=True))
register(BackendImpl(Backend.TRITON_SPMM, "linear", KINDS, _triton_why_not, _identity, _triton_linear))
