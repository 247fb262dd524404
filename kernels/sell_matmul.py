"""sell_matmul: ``y = x @ W^T + bias`` with W in the sliced-ELL layout (``sparsecore.formats.sell``).

Inputs: ``x [M, K]`` fp16/bf16/fp32 (any strides), a ``SellLayout`` of the same dtype and device,
``bias [N] | None``. Output ``y [M, N]`` contiguous in ``x``'s dtype; fp32 accumulation.

Design (decode, M = 1..16, high sparsity). Program ``(s, b)`` owns slice ``s`` (``C`` rows of W) and rows
``b*BLOCK_M ..`` of x. It walks the slice's width in ``BLOCK_J`` steps: each step loads a ``[C, BLOCK_J]``
block of values and columns (row segments are 16-element aligned, so these are 16-byte loads), gathers
``x[:, col]`` (x is a few KB per row: it stays in L1/L2) and accumulates the products element-wise,
reduced once after the loop (no cross-lane traffic inside it). For M > 1 the launcher passes x^T padded to
whole row blocks (one small copy), so a kept value's ``BLOCK_M`` x values are one vector load with no row
mask, a fraction of the instructions per kept value that masked row loads take (``bench/results/ptx_counts_sm90_triton*.md``). Work
and bytes are proportional to the kept values, not to the dense size (see the layout's docstring for why
the bitmap kernel cannot do that). Entries past a row's length are masked, so padding is never read and
a non-finite ``x`` at a column whose weights were all pruned does not reach ``y`` (pruned weights are
absent, not zeros that multiply). Configs are autotuned per (M bucket, sparsity bucket, N, K, C); one under
the interpreter.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from sparsecore.formats.sell import ALIGN, MAX_K, SellLayout

from ._host import cdiv, cpu_launch_ok, empty, interpreting, launch, needs_op, next_pow2, sparsity_bucket

__all__ = ["sell_matmul", "sell_matmul_ref", "check_layout"]

_INTERPRET = interpreting()  # fixed at import, as triton.jit fixes it
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# BLOCK_M * C * BLOCK_J elements of the gathered x block live in registers: at most 64 per thread and 8192
# in all (compiled offline for sm_90: larger blocks spill with 2 warps under triton 3.9).
_MAX_TILE = 8192
_MAX_PER_THREAD = 64


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_J": bj}, num_warps=w, num_stages=2)
            for bm in (1, 2, 4, 8, 16) for bj in (32, 64, 128, 256) for w in (2, 4, 8)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs of this M bucket whose gathered block fits registers; one under the interpreter."""
    args = {**named_args, **kwargs}
    bucket, c = args["M_BUCKET"], args["C"]
    keep = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] == min(bucket, 16)
            and cfg.kwargs["BLOCK_M"] * c * cfg.kwargs["BLOCK_J"] <= min(_MAX_TILE, 32 * cfg.num_warps * _MAX_PER_THREAD)]
    keep = keep or [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] == 1 and cfg.kwargs["BLOCK_J"] == 32][:1]
    return keep[:1] if _INTERPRET else keep


@triton.autotune(configs=_configs(), key=["M_BUCKET", "SPARSITY_BUCKET", "N", "K", "C"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["SPARSITY_BUCKET"])  # an autotuning key only: no compile per value
def _sell_matmul_kernel(
    x_ptr, v_ptr, c_ptr, len_ptr, base_ptr, width_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET, SPARSITY_BUCKET, stride_xm, stride_xk, stride_ym,
    C: tl.constexpr, ALIGN_: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    r_local = tl.arange(0, C)                                                # (C,)
    rows = pid_s * C + r_local
    row_ok = rows < N
    lens = tl.load(len_ptr + rows, mask=row_ok, other=0)                    # (C,) kept per row
    width = tl.load(width_ptr + pid_s)                                       # slice width (multiple of ALIGN_)
    base = tl.load(base_ptr + pid_s)                                         # int64 element offset
    seg = tl.multiple_of(base + r_local.to(tl.int64) * width, ALIGN_)       # (C,) row segment starts
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                         # (BM,)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm                         # (BM,)

    acc = tl.zeros((BLOCK_M, C, BLOCK_J), dtype=tl.float32)  # element-wise: reduced once, after the loop
    for j0 in range(0, width, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)                                       # (BJ,)
        ok = j[None, :] < lens[:, None]                                      # (C, BJ): kept, not padding
        at = seg[:, None] + j[None, :]
        v = tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32)          # (C, BJ)
        col = tl.load(c_ptr + at, mask=ok, other=0).to(tl.int32) & 0xFFFF   # (C, BJ)
        # Rows past M exist (the launcher pads x), so only padding entries are masked: with x's rows side by
        # side in memory (stride_xm == 1) the BLOCK_M values at one column are one vector load.
        xg = tl.load(x_rows[:, None, None] + col[None, :, :].to(tl.int64) * stride_xk,
                     mask=ok[None, :, :], other=0.0)                        # (BM, C, BJ)
        acc += xg.to(tl.float32) * v[None, :, :]

    y = tl.sum(acc, axis=2)                                                  # (BM, C)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    y_at = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    tl.store(y_at, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


def check_layout(layout: SellLayout) -> None:
    """Validate a layout's tensors against each other (what each call then relies on); raises ValueError."""
    if not isinstance(layout, SellLayout):
        raise TypeError(f"expected a SellLayout, got {type(layout).__name__}")
    c = layout.slice_rows
    if not (isinstance(c, int) and c >= 1 and not c & (c - 1)) or not 0 <= layout.k <= MAX_K or layout.n < 0:
        raise ValueError(f"SELL slice_rows must be a power of two and 0 <= k <= {MAX_K}, got "
                         f"slice_rows={c!r}, k={layout.k!r}, n={layout.n!r}")
    n_slices = cdiv(layout.n, layout.slice_rows)
    want = {"row_len": (torch.int32, (layout.n,)), "base": (torch.int64, (n_slices,)),
            "width": (torch.int32, (n_slices,)), "cols": (torch.int16, (layout.values.numel(),))}
    for name, (dtype, shape) in want.items():
        t = getattr(layout, name)
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device != layout.values.device:
            raise ValueError(f"SELL {name} must be contiguous {dtype} {shape} on {layout.values.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if layout.values.dtype not in _DTYPES or layout.values.dim() != 1 or not layout.values.is_contiguous():
        raise ValueError(f"SELL values must be a contiguous 1-D float16/bfloat16/float32 tensor")
    width, base = layout.width.to(torch.int64), layout.base
    if n_slices:
        ends = base + layout.slice_rows * width
        lens = torch.zeros(n_slices * layout.slice_rows, dtype=torch.int64, device=width.device)
        lens[: layout.n] = layout.row_len.to(torch.int64)
        if (bool((width % ALIGN).any()) or bool((width < lens.view(n_slices, -1).amax(1)).any())
                or int(base[0]) != 0 or not torch.equal(base[1:], ends[:-1])
                or int(ends[-1]) != layout.values.numel() or bool((lens < 0).any())):
            raise ValueError("SELL widths, bases and row lengths are inconsistent")
        # every entry a row uses must name a column of x: the kernel gathers x[:, col] unchecked
        slot = torch.arange(layout.values.numel(), device=width.device)
        s_of = torch.repeat_interleave(torch.arange(n_slices, device=width.device), layout.slice_rows * width)
        local = slot - base[s_of]
        w_of = width[s_of].clamp(min=1)
        row = s_of * layout.slice_rows + local // w_of
        used = (local % w_of) < lens[row]
        if bool(((layout.cols.to(torch.int64) & 0xFFFF)[used] >= layout.k).any()):
            raise ValueError(f"SELL cols name a column >= k = {layout.k}")


def sell_matmul(x: torch.Tensor, layout: SellLayout, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T + bias`` for W given as a (validated, see ``check_layout``) ``SellLayout``.

    Checks ``x`` and ``bias`` on every call (cheap); runs as the custom op ``sparsecore::sell_matmul``
    under torch.compile or autograd, and calls the launcher directly in eager inference.

    >>> lay = pack_sell(w, mask); check_layout(lay)
    >>> y = sell_matmul(x, lay)          # == F.linear(x, torch.where(mask, w, 0))
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != layout.k:
        raise ValueError(f"x must be [M, {layout.k}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype != layout.values.dtype or x.device != layout.values.device:
        raise TypeError(f"x must be {layout.values.dtype} on {layout.values.device}, got {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (layout.n,) or bias.dtype != x.dtype or bias.device != x.device
                             or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous {x.dtype} [{layout.n}] tensor on {x.device}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if not (x.is_cuda or (cpu_launch_ok(_INTERPRET) and x.device.type == "cpu")):
        raise ValueError(f"sell_matmul: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), x is on {x.device}")
    args = (x, layout.values, layout.cols, layout.row_len, layout.base, layout.width, bias, layout.slice_rows)
    if needs_op(x, bias):
        return torch.ops.sparsecore.sell_matmul(*args, layout.k)
    return _launch(*args)


@functools.lru_cache(maxsize=None)
def _interpreter_config(bucket: int, slice_rows: int) -> dict:
    (cfg,) = _prune(_configs(), {"M_BUCKET": bucket, "C": slice_rows})
    return dict(cfg.kwargs)


def _launch(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_len: torch.Tensor, base: torch.Tensor,
            width: torch.Tensor, bias: Optional[torch.Tensor], slice_rows: int) -> torch.Tensor:
    m, k = x.shape
    n = row_len.shape[0]
    y = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    if values.numel() == 0:  # every row empty: the kernel's loops are empty, but give it valid pointers
        values = torch.zeros(ALIGN, dtype=x.dtype, device=x.device)
        cols = torch.zeros(ALIGN, dtype=torch.int16, device=x.device)
    n_slices = base.shape[0]
    if m > 1:
        # x^T with its rows padded to a multiple of 16, which every BLOCK_M (a power of two <= 16) divides, so
        # no row needs a mask; a kept value's BLOCK_M x values are contiguous, and a row stride divisible by
        # 16 lets Triton prove the alignment that makes them one vector load.
        xt = empty((k, cdiv(m, 16) * 16), x.dtype, x.device)
        xt[:, :m].copy_(x.t())
        x = xt.t()

    def grid(meta: dict) -> tuple[int, int]:
        return n_slices, cdiv(m, meta["BLOCK_M"])

    # The padded slots are the kernel's work, so the sparsity key counts them (host-side: values.numel()).
    args = (x, values, cols, row_len, base, width, bias if bias is not None else y, y,
            m, n, k, next_pow2(m), sparsity_bucket(values.numel(), n * k), x.stride(0), x.stride(1), y.stride(0))
    meta = dict(C=slice_rows, ALIGN_=ALIGN, HAS_BIAS=bias is not None)
    if _INTERPRET:  # Triton 3.6's autotuner benchmarks even a lone config (needs a driver): launch it directly
        launch(_sell_matmul_kernel.fn, grid, *args, **meta, **_interpreter_config(next_pow2(m), slice_rows))
    else:
        launch(_sell_matmul_kernel, grid, *args, **meta)
    return y


@torch.library.custom_op("sparsecore::sell_matmul", mutates_args=())
def _sell_matmul_op(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_len: torch.Tensor,
                    base: torch.Tensor, width: torch.Tensor, bias: Optional[torch.Tensor],
                    slice_rows: int, k: int) -> torch.Tensor:
    """The op behind ``sell_matmul``. Checks shapes, dtypes and devices (cheap); the layout's contents are
    trusted as ``check_layout`` left them (that check reads them all, so it runs once, not per call)."""
    n = row_len.shape[0]
    if x.dim() != 2 or x.shape[1] != k or values.dtype != x.dtype or cols.dtype != torch.int16 \
            or cols.shape != values.shape or row_len.dtype != torch.int32 or base.dtype != torch.int64 \
            or width.shape != base.shape or base.shape[0] != cdiv(n, slice_rows) \
            or (bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype)) \
            or len({t.device for t in (x, values, cols, row_len, base, width)}) != 1:
        raise ValueError(f"sparsecore::sell_matmul: inconsistent arguments (x {x.dtype} {tuple(x.shape)}, k={k}, "
                         f"values {values.dtype} {tuple(values.shape)}, cols {cols.dtype} {tuple(cols.shape)}, "
                         f"{n} rows in slices of {slice_rows})")
    return _launch(x, values, cols, row_len, base, width, bias, slice_rows)


@_sell_matmul_op.register_fake
def _sell_matmul_fake(x, values, cols, row_len, base, width, bias, slice_rows, k):
    return x.new_empty((x.shape[0], row_len.shape[0]))


def sell_matmul_ref(x: torch.Tensor, layout: SellLayout, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure torch on the same layout (decode to dense, fp32 matmul; float64 stays float64)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt) @ layout.to_dense().to(cdt).t()
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)


def compile_spec(kw: dict) -> tuple:
    """Launch spec of config ``kw`` (BLOCK_M, BLOCK_J) on 16-row slices, as ``_launch`` calls the kernel:
    M = 1 reads x as given (unit K stride), M > 1 the launcher's x^T padded to 16 rows (unit M stride).
    ``(kernel, signature, constexprs, args divisible by 16)`` for ``sparsecore.compile_check``."""
    fn = _sell_matmul_kernel.fn
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": "*fp16", "v_ptr": "*fp16", "c_ptr": "*i16", "len_ptr": "*i32",
                                              "base_ptr": "*i64", "width_ptr": "*i32", "b_ptr": "*fp16",
                                              "y_ptr": "*fp16"}
    one_row = kw["BLOCK_M"] == 1
    const = dict(M=1, M_BUCKET=1, stride_xk=1) if one_row else dict(stride_xm=1)
    const.update(C=16, ALIGN_=16, HAS_BIAS=True, **kw)
    aligned = ["x_ptr", "v_ptr", "c_ptr", "len_ptr", "base_ptr", "width_ptr", "b_ptr", "y_ptr", "N", "K",
               "stride_xm" if one_row else "stride_xk", "stride_ym"]
    return fn, sig, const, aligned
