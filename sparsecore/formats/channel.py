"""Channel format: kept output and input channel indices plus the dense sliced weight.

Byte layout (all little-endian, contiguous):
* ``out_idx``: int32 ``[n_out]``, strictly increasing indices of kept output channels (dim 0);
* ``in_idx``:  int32 ``[n_in]``, strictly increasing indices of kept input channels (dim 1);
* ``values``:  weight dtype ``[n_out, n_in]`` (Linear) or ``[n_out, n_in, kh, kw]`` (Conv2d),
  ``weight[out_idx][:, in_idx]``.
Bytes: ``4 * (n_out + n_in) + n_out * n_in * kh * kw * itemsize``.

The mask must be a *block* mask: ``mask[o, i, ...] == keep_out[o] & keep_in[i]`` (whole output rows,
optionally whole input columns, e.g. the input columns a pruned previous layer no longer feeds).
Anything else raises ``PatternError``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..masks import PatternError, check_channel
from .base import (FormatError, PackedWeight, check_weight_and_mask, dtype_from_name, dtype_name, expect_state,
                   expect_tensor, meta_shape, register_format)

__all__ = ["ChannelWeight", "block_channels"]


def block_channels(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep_out [out], keep_in [in])`` of a block channel mask; raises ``PatternError`` otherwise."""
    per_pair = mask if mask.dim() == 2 else mask.all(dim=(2, 3))
    if mask.dim() == 4 and not torch.equal(per_pair, mask.any(dim=(2, 3))):
        raise PatternError("channel mask must keep or drop whole kh x kw kernels")
    keep_out = per_pair.any(dim=1)
    keep_in = per_pair.any(dim=0)
    expected = keep_out[:, None] & keep_in[None, :]
    if not torch.equal(per_pair, expected):
        o, i = (int(v) for v in (per_pair != expected).nonzero()[0])
        raise PatternError(
            f"mask is not a channel block mask: entry (out={o}, in={i}) is {bool(per_pair[o, i])} but output "
            f"channel {o} is {'kept' if keep_out[o] else 'pruned'} and input channel {i} is "
            f"{'kept' if keep_in[i] else 'pruned'}")
    return keep_out, keep_in


@register_format
class ChannelWeight(PackedWeight):
    __doc__ = __doc__ + """
    >>> keep = torch.tensor([True, False, True])[:, None].expand(3, 8)   # rows 0 and 2 of a [3, 8] weight
    >>> p = ChannelWeight.from_dense(w, keep.clone())                    # p.values: [2, 8], p.out_idx: [0, 2]
    """

    kind = "channel"
    version = 1
    _nonzeros_from_values = True  # values: every kept entry, plus +0.0 fillers at most
    mask_rule = "channel"

    @classmethod
    def check_mask_pattern(cls, mask: torch.Tensor, config: Any) -> None:
        if mask.dim() == 2:  # Linear: whole output rows; 4-D block masks are checked by from_dense (block_channels)
            check_channel(mask)

    def __init__(self, values: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor, shape: tuple[int, ...]):
        self.values, self.out_idx, self.in_idx = values, out_idx, in_idx
        self.shape = tuple(shape)
        self.dtype = values.dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, **params: Any) -> "ChannelWeight":
        """Pack a block channel mask. ``weight`` ``[out, in]`` or ``[C_out, C_in, kh, kw]``."""
        if params:
            raise TypeError(f"ChannelWeight.from_dense takes no parameters, got {sorted(params)}")
        check_weight_and_mask(weight, mask)
        keep_out, keep_in = block_channels(mask)
        out_idx = keep_out.nonzero().flatten().to(torch.int32)
        in_idx = keep_in.nonzero().flatten().to(torch.int32)
        values = weight.index_select(0, out_idx.long()).index_select(1, in_idx.long()).contiguous()
        return cls(values, out_idx, in_idx, tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.values.device)
        if self.out_idx.numel() and self.in_idx.numel():
            rows = out.index_select(0, self.out_idx.long())
            rows.index_copy_(1, self.in_idx.long(), self.values)
            out.index_copy_(0, self.out_idx.long(), rows)
        return out

    @property
    def n_out(self) -> int:
        return int(self.out_idx.numel())

    @property
    def n_in(self) -> int:
        return int(self.in_idx.numel())

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"values": self.values, "out_idx": self.out_idx, "in_idx": self.in_idx}
        return tensors, {"kind": self.kind, "version": self.version, "shape": list(self.shape),
                         "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "ChannelWeight":
        expect_state(cls, tensors, meta, {"values", "out_idx", "in_idx"})
        shape = meta_shape(meta)
        dtype = dtype_from_name(meta.get("dtype"))
        out_idx, in_idx = tensors["out_idx"], tensors["in_idx"]  # present: expect_state checked the names
        for name, idx, limit in (("out_idx", out_idx, shape[0]), ("in_idx", in_idx, shape[1])):
            expect_tensor(tensors, name, torch.int32, (idx.numel(),))
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit or bool((idx[1:] <= idx[:-1]).any())):
                raise FormatError(f"{name} must be strictly increasing indices in [0, {limit})")
        values = expect_tensor(tensors, "values", dtype, (out_idx.numel(), in_idx.numel()) + shape[2:])
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise FormatError("channel values contain NaN or Inf")
        return cls(values.contiguous(), out_idx.contiguous(), in_idx.contiguous(), shape)
