"""Backend registry: one small table from (op, Backend) to an implementation.

Each implementation says whether it can run a given packed weight and input (``why_not`` returns a
reason string, or ``None`` when it can), builds its one-time state from the packed weight
(``prepare``: e.g. a dense copy, a CSR tensor, a cuSPARSELt-compressed weight) and runs.

Contracts of ``run``:
* op ``"linear"``: ``run(state, x, bias) -> y`` with ``x [M, K]`` (2-D, any strides), ``bias [N] | None``,
  ``y [M, N]`` in ``x``'s dtype.
* op ``"conv2d"``: ``run(state, x, bias, conv) -> y`` with ``x [B, C_in, H, W]`` (NCHW or channels-last
  memory format), ``conv`` a ``ConvParams``; ``y [B, C_out, H_out, W_out]``.

An explicitly requested backend that cannot run raises ``BackendUnavailable`` with the reason; nothing
falls back silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch

from ..formats.base import PackedWeight

__all__ = ["Backend", "BackendImpl", "BackendUnavailable", "ConvParams", "register", "candidates", "resolve",
           "triton_why_not", "REGISTRY"]


class Backend(str, Enum):
    """Ways to execute a sparse layer. ``AUTO`` lets the planner choose."""

    AUTO = "auto"
    DENSE = "dense"                    # masked dense weight, cuBLAS / cuDNN / MKL
    REFERENCE = "reference"            # the kernels' pure-torch references on the packed data
    TORCH_CSR = "torch_csr"            # torch sparse CSR matmul (MKL on CPU, cuSPARSE on GPU)
    TRITON_NM = "triton_nm"            # kernels/nm_matmul.py
    CUSPARSELT = "cusparselt"          # torch._cslt_sparse_mm (2:4, compute-bound M)
    CUTLASS = "cutlass"                # torch 2:4 semi-structured via CUTLASS
    TRITON_SPMM = "triton_spmm"        # kernels/spmm.py
    TRITON_SELL = "triton_sell"        # kernels/sell_matmul.py (unstructured, decode sizes)
    SLICED_DENSE = "sliced_dense"      # dense op on the kept channels only, scattered to full width
    TRITON_CHANNEL = "triton_channel"  # kernels/channel_conv.py


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run this layer on this input/device; the message says why."""


@dataclass(frozen=True)
class ConvParams:
    """Conv2d hyper-parameters travelling with a conv call."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass(frozen=True)
class BackendImpl:
    backend: Backend
    op: str                                                        # "linear" | "conv2d"
    kinds: tuple[str, ...]                                         # format kinds it accepts
    why_not: Callable[[PackedWeight, torch.Tensor], str | None]    # None when it can run
    prepare: Callable[[PackedWeight], Any]
    run: Callable[..., torch.Tensor]
    accepts_nd: bool = False  # linear only: ``run`` takes ``x [..., K]`` as is (saves two reshapes per call)
    differentiable: bool = False  # built from torch ops autograd sees through (else sparsecore.autograd steps in)


REGISTRY: dict[tuple[str, Backend, str], BackendImpl] = {}  # (op, backend, format kind) -> implementation


def register(impl: BackendImpl) -> BackendImpl:
    """Register ``impl`` for each format kind it lists; one implementation per (op, backend, kind)."""
    for kind in impl.kinds:
        key = (impl.op, impl.backend, kind)
        if key in REGISTRY:
            raise ValueError(f"backend {impl.backend.value} for op {impl.op} and format {kind!r} registered twice")
        REGISTRY[key] = impl
    return impl


def candidates(op: str, packed: PackedWeight, x: torch.Tensor) -> list[BackendImpl]:
    """Every registered backend for ``op`` and ``packed``'s format that can run ``packed`` on ``x``."""
    return [impl for (o, _, kind), impl in REGISTRY.items()
            if o == op and kind == packed.kind and impl.why_not(packed, x) is None]


def resolve(op: str, backend: Backend | str, packed: PackedWeight, x: torch.Tensor) -> BackendImpl:
    """The implementation of an explicitly chosen ``backend``; raises ``BackendUnavailable`` with the reason."""
    backend = Backend(backend)
    if backend is Backend.AUTO:
        raise ValueError("resolve() takes a concrete backend; AUTO is the planner's job")
    impl = REGISTRY.get((op, backend, packed.kind))
    if impl is None:
        have = sorted(b.value for (o, b, k) in REGISTRY if o == op and k == packed.kind)
        raise BackendUnavailable(f"backend {backend.value!r} has no {op} implementation for the {packed.kind!r} "
                                 f"format; available: {have}")
    reason = impl.why_not(packed, x)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend.value!r} cannot run this {op} layer: {reason}")
    return impl


def triton_why_not(x: torch.Tensor) -> str | None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    if x.is_cuda:
        return None
    if os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu":
        return None
    return f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); input is on {x.device}"


def linear_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    """Shared linear checks: 2-D weight, ``x [M, K]`` with the weight's K, dtype and device."""
    if len(packed.shape) != 2:
        return f"linear needs a 2-D weight, this one has shape {tuple(packed.shape)}"
    if x.dim() != 2 or x.shape[1] != packed.shape[1]:
        return f"input must be [M, {packed.shape[1]}], got {tuple(x.shape)}"
    return _same_place(packed, x)


def conv_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    """Shared conv2d checks: 4-D weight, a 4-D input, dtype and device."""
    if len(packed.shape) != 4:
        return f"conv2d needs a 4-D weight, this one has shape {tuple(packed.shape)}"
    if x.dim() != 4:
        return f"conv2d input must be [B, C, H, W], got {tuple(x.shape)}"
    return _same_place(packed, x)


def _same_place(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if x.dtype != packed.dtype:
        return f"input dtype {x.dtype} differs from weight dtype {packed.dtype}"
    if x.device != packed.device:
        return f"input is on {x.device}, packed weight on {packed.device}"
    return None
