"""Dense baselines on the masked dense weight: F.linear / F.conv2d, and torch CSR matmul.

DENSE accepts every format (it materialises ``to_dense()`` once in ``prepare``), so the planner always
has the dense baseline among its candidates.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..formats.base import PackedWeight
from .registry import Backend, BackendImpl, ConvParams, register

ALL_KINDS = ("nm", "unstructured", "channel")


def _any(packed: PackedWeight, x: torch.Tensor) -> str | None:
    return None


def _linear_run(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias)


def _conv_run(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


register(BackendImpl(Backend.DENSE, "linear", ALL_KINDS, _any, lambda p: p.to_dense(), _linear_run))
register(BackendImpl(Backend.DENSE, "conv2d", ALL_KINDS, _any, lambda p: p.to_dense(), _conv_run))


def _csr_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if len(packed.shape) != 2:
        return "torch CSR runs Linear weights only"
    if x.device.type == "cpu" and packed.dtype != torch.float32:
        return f"torch CSR on CPU is only fast in float32, weight is {packed.dtype}"
    if x.device.type not in ("cpu", "cuda"):
        return f"torch CSR needs a CPU or CUDA tensor, input is on {x.device}"
    return None


def _csr_prepare(packed: PackedWeight) -> torch.Tensor:
    with warnings.catch_warnings():  # torch flags CSR as beta on every conversion; we rely on matmul only
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return packed.to_dense().to_sparse_csr()


def _csr_run(w_csr: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (N, K) @ (K, M) -> (N, M); CSR must be the left operand.
    y = torch.sparse.mm(w_csr, x.t().contiguous()).t()
    if bias is not None:
        y = y + bias
    return y


register(BackendImpl(Backend.TORCH_CSR, "linear", ALL_KINDS, _csr_why_not, _csr_prepare, _csr_run))
