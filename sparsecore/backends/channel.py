"""Backends for the ``channel`` format (``ChannelWeight``: kept out rows x kept in columns).

* SLICED_DENSE ``linear``: ``F.linear`` on ``x[:, in_idx]`` with the sliced weight, scattered into the
  full-width output; ``conv2d``: ``F.conv2d`` on ``x[:, in_idx]`` (groups = 1) or on ``x[:, out_idx]``
  with ``groups = n_out`` (depthwise), scattered likewise. cuBLAS/cuDNN/MKL do the work; the gather of
  the kept input channels is one extra copy of the activations, skipped when every input is kept.
* TRITON_CHANNEL ``conv2d``: ``kernels/channel_conv.py`` (groups = 1), which gathers and scatters
  inside the GEMM: no activation copy, one launch.

Pruned output channels hold ``bias[c]`` (0 without bias), exactly as ``F.conv2d(x, to_dense(), bias)``
and ``F.linear(x, to_dense(), bias)`` (the DENSE backend) compute them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats.base import PackedWeight
from .registry import BackendImpl, ConvParams, conv_why_not, linear_why_not, register

_KINDS = ("channel",)
SLICED_DENSE, TRITON_CHANNEL = "sliced_dense", "triton_channel"


@dataclass(frozen=True)
class _Sliced:
    values: torch.Tensor      # [n_out, n_in] or [n_out, n_in | 1, kh, kw]
    in_idx: torch.Tensor      # int64 [n_in]
    out_idx: torch.Tensor     # int64 [n_out]
    n_out_full: int
    all_in: bool              # every input channel kept: skip the gather


def _sliced_prepare(packed: PackedWeight) -> _Sliced:
    return _Sliced(packed.values, packed.in_idx.long(), packed.out_idx.long(), packed.shape[0],
                   packed.n_in == packed.shape[1])


def _scatter(part: torch.Tensor, st: _Sliced, bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Full-width output: ``part`` (kept channels along dim 1) scattered, bias (or 0) elsewhere."""
    shape = (part.shape[0], st.n_out_full) + tuple(part.shape[2:])
    fmt = torch.channels_last if part.dim() == 4 and _is_channels_last(like) else torch.contiguous_format
    y = torch.empty(shape, dtype=part.dtype, device=part.device, memory_format=fmt)
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.view((1, -1) + (1,) * (part.dim() - 2)).expand(shape))
    return y.index_copy_(1, st.out_idx, part)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# ---- linear ------------------------------------------------------------------------------------------
def _sliced_linear(st: _Sliced, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xs = x if st.all_in else x.index_select(1, st.in_idx)          # (M, n_in)
    part = F.linear(xs, st.values, None if bias is None else bias.index_select(0, st.out_idx))  # (M, n_out)
    return _scatter(part, st, bias, x)


register(BackendImpl(SLICED_DENSE, "linear", _KINDS, linear_why_not, _sliced_prepare, _sliced_linear,
                     differentiable=True))


# ---- conv2d ------------------------------------------------------------------------------------------
def _conv_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    reason = conv_why_not(packed, x)
    if reason is not None:
        return reason
    if x.shape[1] != packed.shape[1] and not _is_depthwise(packed, x):
        return (f"channel-sliced conv runs groups=1 or depthwise convs; weight {tuple(packed.shape)} with "
                f"{x.shape[1]} input channels is a grouped conv")
    return None


def _is_depthwise(packed: PackedWeight, x: torch.Tensor) -> bool:
    return packed.shape[1] == 1 and x.shape[1] == packed.shape[0]


def _sliced_conv(st: _Sliced, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    b_part = None if bias is None else bias.index_select(0, st.out_idx)
    if conv.groups == 1:
        xs = x if st.all_in else x.index_select(1, st.in_idx)      # (B, n_in, H, W)
        part = F.conv2d(xs, st.values, b_part, conv.stride, conv.padding, conv.dilation)
    elif conv.groups == x.shape[1] == st.n_out_full and st.values.shape[1] == 1:
        # Depthwise: kept output channel c reads input channel c only.
        xs = x.index_select(1, st.out_idx)
        part = F.conv2d(xs, st.values, b_part, conv.stride, conv.padding, conv.dilation, st.out_idx.numel())
    else:
        raise ValueError(f"sliced_dense conv2d runs groups=1 or depthwise, got groups={conv.groups} "
                         f"for weight {(st.n_out_full,) + tuple(st.values.shape[1:])}")
    return _scatter(part, st, bias, x)


register(BackendImpl(SLICED_DENSE, "conv2d", _KINDS, _conv_why_not, _sliced_prepare, _sliced_conv,
                     differentiable=True))


# ---- TRITON_CHANNEL ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kernel:
    values: torch.Tensor      # [n_out, n_in, kh, kw] view of [kh, kw, n_in, n_out] memory
    in_idx: torch.Tensor      # int32 [n_in]
    out_idx: torch.Tensor     # int32 [n_out]
    fill_idx: torch.Tensor    # int32 [C_out - n_out], pruned output channels
    n_out_full: int


def _triton_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    reason = _conv_why_not(packed, x)
    if reason is None and x.shape[1] != packed.shape[1]:
        return "channel_conv runs groups=1 convs only (depthwise: use sliced_dense)"
    return reason


def _triton_prepare(packed: PackedWeight) -> _Kernel:
    from sparsecore.kernels.channel_conv import fill_indices
    # Weight tile loads run along n_out: store [kh, kw, n_in, n_out], keep the [n_out, n_in, kh, kw] view.
    values = packed.values.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    return _Kernel(values, packed.in_idx.contiguous(), packed.out_idx.contiguous(),
                   fill_indices(packed.out_idx, packed.shape[0]), packed.shape[0])


def _triton_conv(st: _Kernel, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    from sparsecore.kernels.channel_conv import channel_conv
    if conv.groups != 1:
        raise ValueError(f"triton_channel runs groups=1 convs only, got groups={conv.groups}")
    return channel_conv(x, st.values, st.in_idx, st.out_idx, st.n_out_full, bias, conv.stride, conv.padding,
                        conv.dilation, fill_idx=st.fill_idx)


register(BackendImpl(TRITON_CHANNEL, "conv2d", _KINDS, _triton_why_not, _triton_prepare, _triton_conv,
                     needs=frozenset({"triton"})))
