"""Dense baselines on the masked dense weight: F.linear / F.conv2d, and torch CSR matmul.

DENSE and TORCH_CSR accept every format, including formats registered after this module (``ALL_FORMATS``:
they only need ``to_dense()``, materialised once in ``prepare``), so the planner always has the dense
baseline among its candidates.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..formats.base import PackedWeight
from .registry import ALL_FORMATS, BackendImpl, ConvParams, register

DENSE, TORCH_CSR = "dense", "torch_csr"


def _always(packed: PackedWeight, x: torch.Tensor) -> str | None:
    return None


def _linear_run(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias)


def _conv_run(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# masked dense weight, cuBLAS / cuDNN / MKL
register(BackendImpl(DENSE, "linear", ALL_FORMATS, _always, lambda p: p.to_dense(), _linear_run, accepts_nd=True,
                     differentiable=True))
register(BackendImpl(DENSE, "conv2d", ALL_FORMATS, _always, lambda p: p.to_dense(), _conv_run, differentiable=True))


def _csr_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if len(packed.shape) != 2:
        return "torch CSR runs Linear weights only"
    if x.device.type == "cpu" and packed.dtype != torch.float32:
        return f"torch CSR on CPU is only fast in float32, weight is {packed.dtype}"
    if x.device.type not in ("cpu", "cuda"):
        return f"torch CSR needs a CPU or CUDA tensor, input is on {x.device}"
    return None


@torch.library.custom_op("sparsecore::csr_linear", mutates_args=())
def csr_linear(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
               bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias)`` with ``W`` given by its CSR arrays (``n`` rows, ``x.shape[1]`` columns).

    A custom op so that torch.compile and CUDA graphs see one opaque call (dynamo cannot trace sparse tensors).
    """
    w = torch.sparse_csr_tensor(crow, col, values, (n, x.shape[1]), check_invariants=False)
    return csr_mm(w, x, bias)


@csr_linear.register_fake
def _(crow, col, values, x, bias, n):
    return x.new_empty((x.shape[0], n))


def csr_mm(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ w^T (+ bias)`` for a sparse CSR ``w [N, K]``; ``y`` is contiguous.

    CSR must be the left operand (MKL / cuSPARSE multiply sparse x dense), so the product is ``(w @ x^T)^T``;
    ``x^T`` is passed as a strided view (no copy) and the ``[N, M]`` result is transposed back once.
    """
    y = torch.sparse.mm(w, x.t()).t()  # (N, K) @ (K, M) -> (N, M), viewed as (M, N)
    if y.shape[0] > 1:  # M = 1: the view is already contiguous
        y = y.contiguous()
    if bias is not None:
        y.add_(bias)  # y is a fresh tensor of this call: adding in place saves an allocation
    return y


class CsrState(NamedTuple):
    """Prepared torch-CSR weight: the CSR arrays (what the custom op takes) and a sparse tensor viewing them.

    ``matrix`` shares storage with ``crow``/``col``/``values``, so it costs no bytes; eager calls use it directly
    and skip both the per-call construction and the custom-op dispatch (tens of microseconds per call).
    """

    crow: torch.Tensor    # int64 [N + 1]
    col: torch.Tensor     # int64 [nnz]
    values: torch.Tensor  # weight dtype [nnz]
    n: int
    matrix: torch.Tensor  # sparse CSR [N, K] over the three arrays above


def _csr_prepare(packed: PackedWeight) -> CsrState:
    with warnings.catch_warnings():  # torch flags CSR as beta on every conversion; we rely on matmul only
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w = packed.to_dense().to_sparse_csr()
        # clones: plain dense tensors, not views of a sparse one (dynamo cannot wrap those)
        crow, col, values = w.crow_indices().clone(), w.col_indices().clone(), w.values().clone()
        matrix = torch.sparse_csr_tensor(crow, col, values, tuple(packed.shape), check_invariants=False)
    return CsrState(crow, col, values, packed.shape[0], matrix)


def _csr_run(state: CsrState, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: one opaque op over plain tensors
        return csr_linear(state.crow, state.col, state.values, x, bias, state.n)
    return csr_mm(state.matrix, x, bias)


# torch sparse CSR matmul (MKL on CPU, cuSPARSE on GPU)
register(BackendImpl(TORCH_CSR, "linear", ALL_FORMATS, _csr_why_not, _csr_prepare, _csr_run))
