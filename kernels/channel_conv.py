"""channel_conv: implicit-GEMM conv2d over kept input channels, writing kept output channels.

    y[b, out_idx[j], p, q] = bias[out_idx[j]] + sum_{i, r, s} values[j, i, r, s] * x[b, in_idx[i], p*sh - ph + r*dh, q*sw - pw + s*dw]
    y[b, c, p, q]          = bias[c] (0 without bias)         for every channel c not in out_idx

so ``y == F.conv2d(x, W, bias, ...)`` for the dense weight ``W`` that is ``values`` at
``(out_idx, in_idx)`` and 0 elsewhere (``ChannelWeight.to_dense()``), at ``n_out/C_out * n_in/C_in``
of the FLOPs. groups == 1 only.

GEMM view: M = B * H_out * W_out output pixels, N = n_out kept output channels, K = kh * kw * n_in;
one flat K loop walks (tap (r, s), block of kept input channels gathered through ``in_idx``). One launch also fills the pruned output channels (extra programs along grid axis 1), so
no separate memset pass touches the output.

Memory formats: ``x`` may be NCHW or channels-last (any strides); ``y`` has ``x``'s memory format.
Channels-last is the fast one on GPU: the gathered K axis (channels) is contiguous per pixel, the
store of a ``[BLOCK_M, BLOCK_N]`` tile writes runs of kept channels, and cuDNN's fp16 fast path
is NHWC too, so a channels-last model never pays a layout conversion. NCHW runs correctly (loads are
contiguous along M instead) and is the slower layout. ``values`` may have any strides: the
layout the TRITON_CHANNEL backend prepares (``sparsecore/backends/channel.py``) is ``[kh, kw, n_in, n_out]`` in memory, which makes
the weight tile loads contiguous along N.

Offsets are int32 inside a sample and int64 across the batch: one sample must stay under 2^31 elements.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._host import cdiv, cpu_launch_ok, interpreting, launch, needs_op

__all__ = ["channel_conv", "channel_conv_ref", "fill_indices", "conv_out_size"]

_INTERPRET = interpreting()  # fixed at import, as triton.jit fixes it
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); small-M configs serve batch 1 at 7x7 / 14x14 maps.
_CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
            (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (32, 64, 32, 4, 4), (16, 64, 64, 4, 3)]
# Under the interpreter one small config: fast on CPU, and odd test shapes then span several tiles.
_AUTOTUNE = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in ([(16, 16, 16, 1, 1)] if _INTERPRET else _CONFIGS)]


@triton.autotune(configs=_AUTOTUNE, key=["M", "N_IN", "N_OUT", "KH", "KW", "IS_NHWC"])
@triton.jit
def _channel_conv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, in_idx_ptr, out_idx_ptr, fill_idx_ptr,
    M, H, W, OH, OW, N_IN, N_OUT, N_FILL,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wc, stride_wr, stride_ws,
    stride_yb, stride_yc, stride_yh, stride_yw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IS_NHWC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    b = offs_m // (OH * OW)
    rem = offs_m % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    y_row = b.to(tl.int64) * stride_yb + oh * stride_yh + ow * stride_yw          # (BLOCK_M,)
    n_tiles = tl.cdiv(N_OUT, BLOCK_N)
    if pid_n < n_tiles:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_b = b.to(tl.int64) * stride_xb
        oh0 = oh * SH - PH
        ow0 = ow * SW - PW
        # One flat K loop over (tap, channel block) so the software pipeline (num_stages) spans taps:
        # at 50% of 64 channels a tap holds a single BLOCK_K step.
        k_blocks = tl.cdiv(N_IN, BLOCK_K)
        for t in range(0, KH * KW * k_blocks):
            tap = t // k_blocks
            k0 = (t % k_blocks) * BLOCK_K
            r = tap // KW
            s = tap % KW
            ih = oh0 + r * DH
            iw = ow0 + s * DW
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_b + ih * stride_xh + iw * stride_xw                             # (BLOCK_M,)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < N_IN
            cin = tl.load(in_idx_ptr + offs_k, mask=k_ok, other=0)                  # gathered channels
            a = tl.load(x_ptr + x_row[:, None] + cin[None, :] * stride_xc,
                        mask=pix_ok[:, None] & k_ok[None, :], other=0.0)            # (BLOCK_M, BLOCK_K)
            wt = tl.load(w_ptr + r * stride_wr + s * stride_ws + offs_k[:, None] * stride_wc
                         + offs_n[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if DOT_FP32:
                # fp32 inputs: no silent TF32. Also bf16 under the interpreter, whose bf16 dot
                # multiplies raw bits (triton 3.9); a GPU always takes the native bf16 dot.
                acc = tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, wt, acc)
        cout = tl.load(out_idx_ptr + offs_n, mask=n_ok, other=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cout, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_row[:, None] + cout[None, :] * stride_yc, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        # Pruned output channels: bias (or 0), written here so the whole output is one launch.
        offs_f = (pid_n - n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        f_ok = offs_f < N_FILL
        cfill = tl.load(fill_idx_ptr + offs_f, mask=f_ok, other=0)
        val = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_BIAS:
            val += tl.load(bias_ptr + cfill, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_row[:, None] + cfill[None, :] * stride_yc, val.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & f_ok[None, :])


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of a conv along one spatial axis (PyTorch's formula)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def fill_indices(out_idx: torch.Tensor, c_out_full: int) -> torch.Tensor:
    """Pruned output channels: int32 ``[c_out_full - n_out]``, the complement of ``out_idx``.

    Uses ``nonzero`` (a device sync on CUDA): compute it once when preparing a layer, not per call.
    """
    keep = torch.zeros(c_out_full, dtype=torch.bool, device=out_idx.device)
    keep[out_idx.long()] = True
    return (~keep).nonzero().flatten().to(torch.int32)


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def _check(x: torch.Tensor, values: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor, c_out_full: int,
           bias: torch.Tensor | None, fill_idx: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("values", values), ("in_idx", in_idx), ("out_idx", out_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C_in, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES or values.dtype != x.dtype:
        raise TypeError(f"x and values must share a dtype in float16/bfloat16/float32, got {x.dtype} and {values.dtype}")
    if values.dim() != 4:
        raise ValueError(f"values must be 4-D [n_out, n_in, kh, kw], got shape {tuple(values.shape)}")
    for name, idx, n, limit in (("in_idx", in_idx, values.shape[1], x.shape[1]),
                                ("out_idx", out_idx, values.shape[0], c_out_full)):
        if idx.dtype != torch.int32 or idx.dim() != 1 or idx.numel() != n or not idx.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 [{n}] tensor, got {idx.dtype} {tuple(idx.shape)}")
        if n > limit:
            raise ValueError(f"{name} has {n} entries but only {limit} channels exist")
    if bias is not None and (bias.shape != (c_out_full,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous {x.dtype} [{c_out_full}] tensor (full width), "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    if fill_idx is not None and (fill_idx.dtype != torch.int32 or fill_idx.shape != (c_out_full - out_idx.numel(),)):
        raise ValueError(f"fill_idx must be int32 [{c_out_full - out_idx.numel()}], got {fill_idx.dtype} {tuple(fill_idx.shape)}")
    devs = {t.device for t in (x, values, in_idx, out_idx) + tuple(t for t in (bias, fill_idx) if t is not None)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def _launch(x: torch.Tensor, values: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
            fill_idx: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    b, _, h, w = x.shape
    _, _, oh, ow = y.shape
    n_out, n_in, kh, kw = values.shape
    m = b * oh * ow
    if m == 0:
        return y
    nhwc = x.stride(1) == 1 and x.shape[1] > 1
    n_fill = fill_idx.numel()

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(n_out, meta["BLOCK_N"]) + cdiv(n_fill, meta["BLOCK_N"]))

    launch(
        _channel_conv_kernel, grid,
        x, values, bias if bias is not None else y, y, in_idx, out_idx, fill_idx,
        m, h, w, oh, ow, n_in, n_out, n_fill,
        *x.stride(), *values.stride(), *y.stride(),
        *stride, *padding, *dilation,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, IS_NHWC=nhwc,
        DOT_FP32=x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16),
    )
    return y


def _empty_out(x: torch.Tensor, c_out_full: int, values: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    oh = conv_out_size(x.shape[2], values.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], values.shape[3], stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return torch.empty((x.shape[0], c_out_full, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("sparsecore::channel_conv", mutates_args=())
def _channel_conv_op(x: torch.Tensor, values: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
                     fill_idx: torch.Tensor, bias: torch.Tensor | None, c_out_full: int, stride: list[int],
                     padding: list[int], dilation: list[int]) -> torch.Tensor:
    y = _empty_out(x, c_out_full, values, stride, padding, dilation)
    return _launch(x, values, in_idx, out_idx, fill_idx, bias, y, tuple(stride), tuple(padding), tuple(dilation))


@_channel_conv_op.register_fake
def _(x, values, in_idx, out_idx, fill_idx, bias, c_out_full, stride, padding, dilation):
    return _empty_out(x, c_out_full, values, stride, padding, dilation)


def channel_conv(x: torch.Tensor, values: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
                 c_out_full: int, bias: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, *,
                 fill_idx: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Channel-sliced conv2d (groups=1). Shapes:

    ``x [B, C_in, H, W]`` (NCHW or channels-last), ``values [n_out, n_in, kh, kw]`` (any strides),
    ``in_idx`` int32 ``[n_in]`` / ``out_idx`` int32 ``[n_out]`` (kept channels, each index once),
    ``bias [c_out_full] | None`` -> ``y [B, c_out_full, H_out, W_out]`` in ``x``'s dtype and memory format.
    ``fill_idx``: precomputed ``fill_indices(out_idx, c_out_full)`` (avoids a sync per call).
    ``out``: preallocated output (this path bypasses the custom op; use it outside torch.compile).

    >>> y = channel_conv(x, w.values, w.in_idx, w.out_idx, 256, None, 1, 1)   # w: ChannelWeight
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    if not isinstance(c_out_full, int) or c_out_full < 1:
        raise ValueError(f"c_out_full must be a positive int, got {c_out_full!r}")
    _check(x, values, in_idx, out_idx, c_out_full, bias, fill_idx)
    if x.device.type != "cuda" and not cpu_launch_ok(_INTERPRET):
        raise RuntimeError("channel_conv runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                           "use channel_conv_ref on CPU")
    if fill_idx is None:
        fill_idx = fill_indices(out_idx, c_out_full)
    if out is not None:
        expect = _empty_out(x, c_out_full, values, stride, padding, dilation)
        if out.shape != expect.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} {tuple(expect.shape)} on {x.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        return _launch(x, values, in_idx, out_idx, fill_idx, bias, out, stride, padding, dilation)
    if needs_op(x, bias):
        return _channel_conv_op(x, values, in_idx, out_idx, fill_idx, bias, c_out_full, list(stride),
                                list(padding), list(dilation))
    # Eager inference: skip the custom-op dispatcher (tens of microseconds of Python per call).
    y = _empty_out(x, c_out_full, values, stride, padding, dilation)
    return _launch(x, values, in_idx, out_idx, fill_idx, bias, y, stride, padding, dilation)


def channel_conv_ref(x: torch.Tensor, values: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
                     c_out_full: int, bias: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                     padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1) -> torch.Tensor:
    """Pure-torch ``channel_conv``: F.conv2d on the gathered channels, scattered to full width."""
    part = F.conv2d(x.index_select(1, in_idx.long()), values, None, stride, padding, dilation)
    y = x.new_zeros((x.shape[0], c_out_full) + tuple(part.shape[2:]))
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    y.index_add_(1, out_idx.long(), part)
    return y


def compile_spec(block_m: int, block_n: int, block_k: int) -> tuple:
    """Launch spec of a 3x3 fp16 conv on channels-last x and the backend's ``[kh, kw, n_in, n_out]`` weight,
    as ``_launch`` calls the kernel: ``(kernel, signature, constexprs, args divisible by 16)`` for
    ``sparsecore.compile_check``."""
    fn = _channel_conv_kernel.fn
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": "*fp16", "w_ptr": "*fp16", "bias_ptr": "*fp16",
                                              "y_ptr": "*fp16", "in_idx_ptr": "*i32", "out_idx_ptr": "*i32",
                                              "fill_idx_ptr": "*i32"}
    const = dict(KH=3, KW=3, HAS_BIAS=True, DOT_FP32=False, IS_NHWC=True, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k, stride_xc=1, stride_wn=1)
    aligned = ["x_ptr", "w_ptr", "bias_ptr", "y_ptr", "in_idx_ptr", "out_idx_ptr", "fill_idx_ptr", "stride_xb",
               "stride_xh", "stride_xw", "stride_wc", "stride_wr", "stride_ws", "stride_yb", "stride_yh", "stride_yw"]
    return fn, sig, const, aligned
