"""Backends for the ``nm`` format: torch reference, Triton N:M kernel, PyTorch 2:4 (cuSPARSELt, CUTLASS).

* REFERENCE ``linear``: ``nm_matmul_ref`` on the packed tensors; ``conv2d``: unpack once, ``F.conv2d``.
* TRITON_NM ``linear``: ``kernels/nm_matmul.py`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
* CUSPARSELT / CUTLASS ``linear``: ``torch.sparse`` semi-structured tensors built once in ``prepare``;
  2:4-compatible weights only (m = 4, n <= 2: a 1:4 mask is also a 2:4 mask), fp16/bf16, CUDA.
  PyTorch's CUTLASS 2:4 kernels are compiled for compute capability 8.x only; cuSPARSELt needs >= 8.0.
  Their linear copies a non-contiguous ``x`` (torch views it as 2-D); the weight is never copied per call.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..formats.base import PackedWeight
from .registry import BackendImpl, ConvParams, conv_why_not, linear_why_not, register

__all__ = ["torch_24_why_not"]

_KINDS = ("nm",)
REFERENCE, TRITON_NM, CUSPARSELT, CUTLASS = "reference", "triton_nm", "cusparselt", "cutlass"
_HALF = (torch.float16, torch.bfloat16)
# (weight rows, weight cols) multiples required by torch.sparse's semi-structured classes (fp16/bf16).
_TORCH_24_SHAPE = {CUSPARSELT: (16, 16), CUTLASS: (32, 64)}


# ---- REFERENCE ---------------------------------------------------------------------------------------
def _ref_prepare(packed: Any) -> Any:
    return packed


def _ref_linear(packed: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from sparsecore.kernels.nm_matmul import nm_matmul_ref
    return nm_matmul_ref(x, packed.values, packed.positions, packed.n, packed.m, bias)


def _ref_conv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


register(BackendImpl(REFERENCE, "linear", _KINDS, linear_why_not, _ref_prepare, _ref_linear,
                     differentiable=True, plannable=False))
register(BackendImpl(REFERENCE, "conv2d", _KINDS, conv_why_not, lambda p: p.to_dense(), _ref_conv,
                     differentiable=True, plannable=False))


# ---- TRITON_NM ---------------------------------------------------------------------------------------
def _triton_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if packed.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"Triton N:M runs float16/bfloat16/float32, weight is {packed.dtype}"
    return linear_why_not(packed, x)


def _triton_prepare(packed: Any) -> tuple:
    from sparsecore.kernels.nm_matmul import check_packed, nm_matmul_prechecked
    check_packed(packed.values, packed.positions, packed.n, packed.m)  # once, so that each call skips it
    return nm_matmul_prechecked, packed.values, packed.positions, packed.n, packed.m


def _triton_linear(state: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn, values, positions, n, m = state  # resolved in prepare: no import or attribute lookups per call
    return fn(x, values, positions, n, m, bias)


register(BackendImpl(TRITON_NM, "linear", _KINDS, _triton_why_not, _triton_prepare, _triton_linear,
                     needs=frozenset({"triton"})))


# ---- PyTorch 2:4: cuSPARSELt and CUTLASS -------------------------------------------------------------
def torch_24_why_not(backend: str, packed: PackedWeight, x: torch.Tensor) -> str | None:
    """Why PyTorch's semi-structured ``backend`` ("cusparselt" or "cutlass") cannot run ``packed`` on ``x``."""
    name = backend = str(backend)
    if getattr(packed, "m", None) != 4 or getattr(packed, "n", 99) > 2:
        return f"{name} runs 2:4 sparsity only, weight is {getattr(packed, 'n', '?')}:{getattr(packed, 'm', '?')}"
    if packed.dtype not in _HALF:
        return f"{name} 2:4 runs float16/bfloat16 weights, got {packed.dtype}"
    reason = linear_why_not(packed, x)
    if reason is not None:
        return reason
    if not x.is_cuda:
        return f"{name} needs a CUDA tensor, input is on {x.device}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if backend == CUTLASS and major != 8:
        return f"PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only, this GPU is {major}.{minor}"
    if backend == CUSPARSELT:
        if major < 8:
            return f"cuSPARSELt 2:4 needs compute capability >= 8.0, this GPU is {major}.{minor}"
        if not torch.backends.cusparselt.is_available():
            return "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    rows, cols = _TORCH_24_SHAPE[backend]
    out, k_dim = packed.shape
    if out < rows or out % rows or k_dim < cols or k_dim % cols:
        return (f"{name} needs weight [out, K] with out a multiple of {rows} and K a multiple of {cols}, "
                f"got {(out, k_dim)}")
    return None


def _semi_linear(w_sparse: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # torch's semi-structured linear views x as 2-D, so a strided x is copied here (activations only,
    # never the weight); pass a contiguous x to avoid it.
    return F.linear(x if x.is_contiguous() else x.contiguous(), w_sparse, bias)


for _name in (CUSPARSELT, CUTLASS):
    register(BackendImpl(
        _name, "linear", _KINDS,
        lambda p, x, b=_name: torch_24_why_not(b, p, x),
        lambda p, n=_name: p.to_torch_semi_structured(n),
        _semi_linear,
        needs=frozenset({"cuda"}),
    ))
