"""Sliced ELLPACK ("SELL") execution layout for unstructured weights at decode sizes (never saved).

Why a second layout. The tiled bitmap (``UnstructuredWeight``) is the smallest format below 97% sparsity,
but a kernel must visit every *dense* position of a tile (shift, popcount, masked load) to find the kept
ones: a fixed instruction count per dense element whatever the sparsity (``bench/results/ptx_counts_sm90_triton*.md``), which on an H100 takes
about as long to issue as dense fp16 takes to stream, so at 90% it cannot reach the 4x that its 0.33 B
per element promise. SELL stores each kept value with its column, so work is per kept value:

* bytes per dense element (fp16, ``s`` = sparsity, ~5-10% padding for random masks): ``4 (1 - s)``
  -> 0.42 B at 90% (ceiling ~4.8x vs 2 B dense), 0.21 B at 95%, 1.2 B at 70%, 2.1 B at 50% (no gain);
* per kept value: one vectorised value load, one index load, one gather of ``x`` (cache resident), one FMA.

The TRITON_SELL backend builds it once from the packed bitmap (``prepare``); the planner picks it per batch
size only where it measured faster. Files keep the bitmap format; this layout is rebuilt on load.

Layout, for a ``[N, K]`` matrix (``K <= 65536``) and slices of ``slice_rows`` (C) rows:

* slice ``s`` holds rows ``s*C .. s*C + C - 1`` (rows ``>= N`` are empty); its width ``width[s]`` is the
  largest kept count of its rows rounded up to a multiple of ``ALIGN`` (16), so every row segment starts
  on a 32-byte boundary and the kernel can load 16 bytes at a time;
* ``values`` (weight dtype) and ``cols`` (int16: column ``c`` stored as ``c - 65536`` when ``c >= 32768``;
  read back as ``cols & 0xFFFF``) are ``[sum_s C * width[s]]``: row ``r`` (local ``r % C``) of slice ``s``
  occupies ``base[s] + (r % C) * width[s] + j`` for ``j < width[s]``; its first ``row_len[r]`` entries are
  its kept values in increasing column order, the rest padding (value 0, column 0, never read);
* ``row_len`` int32 ``[N]``; ``base`` int64 ``[n_slices]`` (``base[0] = 0``,
  ``base[s + 1] = base[s] + C * width[s]``); ``width`` int32 ``[n_slices]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..intmath import cdiv

__all__ = ["SellLayout", "pack_sell", "ALIGN", "MAX_K"]

ALIGN = 16          # row segments start on multiples of 16 elements (32 B for fp16)
MAX_K = 1 << 16     # columns fit 16 bits


@dataclass(frozen=True)
class SellLayout:
    """The tensors of the layout above (all on one device) and its sizes."""

    values: torch.Tensor    # [total] weight dtype
    cols: torch.Tensor      # [total] int16
    row_len: torch.Tensor   # [N] int32
    base: torch.Tensor      # [n_slices] int64
    width: torch.Tensor     # [n_slices] int32
    n: int
    k: int
    slice_rows: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.cols, self.row_len, self.base, self.width))

    def to_dense(self) -> torch.Tensor:
        """The ``[N, K]`` matrix it encodes (pruned = 0), pure torch: the layout's own oracle."""
        c = self.slice_rows
        n_slices = self.width.numel()
        out = torch.zeros(n_slices * c, self.k, dtype=self.values.dtype, device=self.values.device)
        cols = self.cols.to(torch.int64) & 0xFFFF
        for s in range(n_slices):
            w, b = int(self.width[s]), int(self.base[s])
            if w == 0:
                continue
            rows = torch.arange(s * c, s * c + c, device=out.device)
            lens = torch.zeros(c, dtype=torch.int64, device=out.device)
            real = rows < self.n
            lens[real] = self.row_len[rows[real]].to(torch.int64)
            seg_v = self.values[b: b + c * w].view(c, w)
            seg_c = cols[b: b + c * w].view(c, w)
            keep = torch.arange(w, device=out.device)[None, :] < lens[:, None]
            r_idx = rows[:, None].expand(c, w)[keep]
            out[r_idx, seg_c[keep]] = seg_v[keep]
        return out[: self.n]


def pack_sell(weight: torch.Tensor, mask: torch.Tensor, slice_rows: int = 16) -> SellLayout:
    """Build the layout of ``weight [N, K]`` under a bool ``mask [N, K]`` (kept entries, zeros included)."""
    if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"pack_sell needs a 2-D weight and a bool mask of its shape, got {tuple(weight.shape)} "
                         f"and {mask.dtype} {tuple(mask.shape)}")
    if slice_rows < 1 or slice_rows & (slice_rows - 1):
        raise ValueError(f"slice_rows must be a power of two, got {slice_rows}")
    n, k = weight.shape
    if k > MAX_K:
        raise ValueError(f"SELL stores 16-bit columns: K must be <= {MAX_K}, got {k}")
    dev = weight.device
    c = slice_rows
    n_slices = cdiv(n, c)
    row_len = mask.sum(dim=1, dtype=torch.int64)                                   # [N]
    lens_padded = torch.zeros(n_slices * c, dtype=torch.int64, device=dev)
    lens_padded[:n] = row_len
    width = lens_padded.view(n_slices, c).amax(dim=1) if n_slices else lens_padded[:0]
    width = (width + ALIGN - 1) // ALIGN * ALIGN                                   # [n_slices]
    base = torch.zeros(n_slices, dtype=torch.int64, device=dev)
    if n_slices > 1:
        base[1:] = torch.cumsum(c * width, 0)[:-1]
    total = int((c * width).sum()) if n_slices else 0
    values = torch.zeros(total, dtype=weight.dtype, device=dev)
    cols = torch.zeros(total, dtype=torch.int16, device=dev)
    r, col = mask.nonzero(as_tuple=True)                                          # row-major: columns ascend per row
    if r.numel():
        row_start = torch.cumsum(row_len, 0) - row_len                            # index of each row's first entry
        rank = torch.arange(r.numel(), device=dev) - row_start[r]                 # j of each kept entry in its row
        s = r // c
        pos = base[s] + (r % c) * width[s] + rank
        values[pos] = weight[r, col]
        cols[pos] = torch.where(col >= 1 << 15, col - (1 << 16), col).to(torch.int16)
    return SellLayout(values, cols, row_len.to(torch.int32), base, width.to(torch.int32), n, k, c)
