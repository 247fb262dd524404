"""N:M sparse linear: ``y = x @ W^T (+ bias)`` with ``W`` in the ``NMWeight`` layout, fp32 accumulation.

Inputs (see ``sparsecore.formats.nm`` for the byte layout):
* ``x``: ``[M, K]`` fp16/bf16/fp32, any strides (the kernel reads through both strides, so a transposed
  or sliced activation costs no copy; a unit K stride coalesces best);
* ``values``: ``[N, S]`` contiguous, ``S = K * n / m``, same dtype as ``x``;
* ``positions``: uint8 ``[N, ceil(S * log2(m) / 8)]`` contiguous, per-row little-endian bit streams, in
  the format's canonical form (a group's n positions strictly increasing, as ``NMWeight`` guarantees and
  ``check_packed`` verifies; the m = 4 tile expansion relies on it);
* ``bias``: ``[N]`` contiguous or ``None``.
Output ``y``: new contiguous ``[M, N]`` in ``x``'s dtype.

Design. Decode is memory bound on paper (the compressed weight is read once), but only if the kernel
spends few instructions per weight element: an H100 issues ~33 T thread-instructions/s, only ~17 T of
them integer (64 INT32 lanes per SM), against ~3 TB/s, so streaming a 2:4 fp16 weight (1.125 B per
element) leaves ~12 instructions, ~6 of them integer, per element. Two paths:

* gather (M <= 4, n a power of two): each program owns ``BLOCK_N`` weight rows, reads contiguous blocks of
  their values and position bytes, and multiplies each kept value by ``x[:, its column]`` (x is a few KB,
  cache resident), accumulating element-wise and reducing once at the end (``_gather_rows``);
* tensor cores (any M; 16-row blocks for decode): a dense ``[BLOCK_N, BLOCK_K]`` tile is expanded in
  registers and fed to ``tl.dot``. For m = 4 (2:4, 1:4) ``_expand_m4`` reads each row's position bytes for
  the tile in one contiguous load (K slices start on multiples of 32, so a tile starts on a byte), splits
  the 2-bit fields in-thread and builds the tile's 4 columns with one compare-and-select per slot; other
  patterns use the general ``_expand_slots``.

Both paths stay within that budget in the sm_90 PTX of their main loops (``bench/results/ptx_counts_sm90_triton*.md``). When even 16-row
blocks of N
cannot fill the GPU (N < ~16 * #SMs), K is split over ``SPLIT_K`` programs writing fp32 partials that are
summed in a fixed order afterwards (deterministic; no atomics). Configs are autotuned per (M bucket, N, K,
n, m, SPLIT_K, dtype); under ``TRITON_INTERPRET=1`` one small config runs (``INTERPRET_GATHER`` picks the path).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sparsecore.formats.nm import check_nm_params, position_bits, positions_row_bytes, unpack_positions

from ._host import cdiv, empty, interpreting, launch, needs_op, next_pow2, num_sms

__all__ = ["nm_matmul", "nm_matmul_prechecked", "check_packed", "nm_matmul_ref", "choose_split_k"]

_INTERPRET = interpreting()  # fixed at import, as triton.jit fixes it
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Which path the interpreter runs (on a GPU the autotuner tries both where both apply); tests flip it.
INTERPRET_GATHER = False


def _autotune_bucket(m_rows: int) -> int:
    """Autotune bucket of the row count: next power of two up to 64, then 128 for every larger M."""
    return min(next_pow2(m_rows), 128)


def _configs() -> list[triton.Config]:
    """Candidate tiles. Chosen offline (no GPU needed) by compiling for sm_90 with ptxas and counting the
    main loop's PTX instructions per weight element (``bench/results/ptx_counts_sm90_triton*.md``), since at decode sizes instruction issue, not
    DRAM, is what a careless expansion runs out of; a broadcast-multiply-and-reduce on CUDA cores costs
    several times more than either path and is not a candidate. fp16/bf16 tiles do not spill; fp32 ``tl.dot``
    in "ieee" precision does (FMA dot layout): fp32 is supported for correctness, not tuned."""
    cfgs = []
    # Gather tiles for M <= 4: no dense tile; each kept value meets x[:, its column].
    for bm, bn, bk, warps in ((1, 8, 256, 4), (1, 8, 512, 4), (1, 16, 256, 4), (1, 4, 512, 4), (1, 8, 1024, 8),
                              (2, 8, 256, 4), (2, 8, 512, 4), (4, 8, 256, 4), (4, 4, 256, 4)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GATHER": True},
                                  num_warps=warps, num_stages=3))
    # Tensor-core tiles: decode (16-row blocks, also offered to M < 16) and prefill (cuSPARSELt is usually
    # faster there). Decode is memory bound: 16-wide N tiles give N / 16 programs (256 for N = 4096, about
    # two per SM on an H100), where 64-wide ones leave half the SMs idle; ``choose_split_k`` assumes 16.
    for bm, bn, bk, warps in ((16, 16, 128, 4), (16, 16, 256, 4), (16, 32, 128, 4), (32, 16, 128, 4),
                              (16, 64, 64, 4), (16, 64, 128, 8), (32, 64, 64, 4), (32, 32, 128, 4),
                              (64, 64, 64, 8), (64, 128, 64, 8), (128, 64, 64, 8)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GATHER": False},
                                  num_warps=warps, num_stages=3))
    return cfgs


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs made for this M bucket; a single one under the interpreter (no benchmarking there)."""
    args = {**named_args, **kwargs}
    bucket, m_dense, ns = args["M_BUCKET"], args["MS"], args["NS"]
    gather_ok = not ns & (ns - 1)  # the gather walks power-of-two blocks of slots: n must be 1, 2 or 4
    kw = lambda c: c.kwargs  # noqa: E731
    if bucket <= 4:
        keep = [c for c in configs if (kw(c)["GATHER"] and gather_ok and kw(c)["BLOCK_M"] == bucket)
                or (not kw(c)["GATHER"] and kw(c)["BLOCK_M"] == 16 and kw(c)["BLOCK_N"] <= 32)]
    elif bucket <= 16:
        keep = [c for c in configs if not kw(c)["GATHER"] and kw(c)["BLOCK_M"] == 16 and kw(c)["BLOCK_N"] <= 64]
    elif bucket <= 64:
        keep = [c for c in configs if not kw(c)["GATHER"] and 16 <= kw(c)["BLOCK_M"] <= bucket
                and kw(c)["BLOCK_N"] <= 64]
    else:
        keep = [c for c in configs if not kw(c)["GATHER"] and kw(c)["BLOCK_M"] >= 64]
    keep = [c for c in keep if kw(c)["BLOCK_K"] >= m_dense]
    if _INTERPRET:
        # One small config under the interpreter: same code path, no benchmarking, few numpy steps.
        gather = INTERPRET_GATHER and gather_ok and bucket <= 4
        c = next(c for c in keep if kw(c)["GATHER"] == gather)
        cfg = dict(kw(c), BLOCK_N=16, BLOCK_K=max(32, m_dense))
        return [triton.Config(cfg, num_warps=c.num_warps, num_stages=c.num_stages)]
    return keep


@triton.jit
def _decode_positions(p_rows, slot, ok, row_bytes, BITS: tl.constexpr, MS: tl.constexpr):
    """In-group positions of ``slot`` (any shape) from the little-endian bit streams at ``p_rows``."""
    bit = slot * BITS
    byte = bit // 8
    word = tl.load(p_rows + byte, mask=ok, other=0).to(tl.int32)
    if BITS == 3:  # a 3-bit field may straddle into the next byte
        hi = tl.load(p_rows + byte + 1, mask=ok & (byte + 1 < row_bytes), other=0).to(tl.int32)
        word = word | (hi << 8)
    return (word >> (bit % 8)) & (MS - 1)


@triton.jit
def _expand_slots(v_ptr, p_ptr, offs_n, n_ok, k0, g_end, stride_vn, stride_pn, row_bytes,
                  NS: tl.constexpr, NS_P2: tl.constexpr, MS: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense (BN, BK) tile from one contiguous (BN, BG, n) load of the slots (vectorisable loads)."""
    BLOCK_G: tl.constexpr = BLOCK_K // MS
    g = k0 // MS + tl.arange(0, BLOCK_G)                                     # (BG,)
    ar_j = tl.arange(0, NS_P2)                                               # (NP,) slot in group, padded to 2^x
    slot = g[None, :, None] * NS + ar_j[None, None, :]                       # (1, BG, NP); slot s = g * n + j
    ok = n_ok[:, None, None] & (g[None, :, None] < g_end) & (ar_j[None, None, :] < NS)
    rows = offs_n[:, None, None].to(tl.int64)
    vals = tl.load(v_ptr + rows * stride_vn + slot, mask=ok, other=0.0)    # (BN, BG, NP)
    pos = _decode_positions(p_ptr + rows * stride_pn, slot, ok, row_bytes, BITS, MS)
    # w[r, g, p] = the value of the slot at position p (a group's positions are distinct), else 0.
    hit = pos[:, :, :, None] == tl.arange(0, MS)[None, None, None, :]      # (BN, BG, NP, m)
    w3 = tl.sum(tl.where(hit, vals[:, :, :, None], 0.0), axis=2)             # (BN, BG, m)
    return tl.reshape(w3, (BLOCK_N, BLOCK_K)).to(vals.dtype)


@triton.jit
def _expand_m4(v_ptr, p_ptr, offs_n, n_ok, k0, g_end, stride_vn, stride_pn, row_bytes, NS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """Dense (BN, BK) tile for m = 4 and n in (1, 2): each row's position bytes for the tile in one contiguous
    load, split in-thread into 2-bit fields, then per dense element one compare-and-select per slot
    (far fewer sm_90 instructions than ``_expand_slots``, whose 4-D compare and reduction dominate a decode
    loop). ``k0`` must be a multiple of 32, so the tile starts on a byte (one
    byte holds 4 fields: 2 groups of 2:4, 4 of 1:4); ``EVEN`` (full tile) drops the masks. A gather of one
    byte per group instead fails to compile (triton 3.6, sm_90) for 64/128-row blocks."""
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    rows = offs_n[:, None].to(tl.int64)
    p_rows = p_ptr + rows * stride_pn
    v_rows = v_ptr + rows * stride_vn
    s = NS * (k0 // 4) + tl.arange(0, NS * BLOCK_G)                         # (NS BG,) the tile's slots
    b = NS * k0 // 16 + tl.arange(0, NS * BLOCK_G // 4)                     # (NS BG / 4,) its position bytes
    if EVEN:
        byte = tl.load(p_rows + b[None, :])
        v = tl.load(v_rows + s[None, :])                                     # (BN, NS BG)
    else:  # bytes past the row read 0; their slots (past g_end) are masked to 0 like their x
        byte = tl.load(p_rows + b[None, :], mask=n_ok[:, None] & (b < row_bytes)[None, :], other=0)
        v = tl.load(v_rows + s[None, :], mask=n_ok[:, None] & (s < NS * g_end)[None, :], other=0.0)
    fields = tl.interleave(byte & 15, byte >> 4).to(tl.int32)               # (BN, 2:4 -> BG | 1:4 -> BG/2)
    if NS == 1:
        fields = tl.interleave(fields & 3, fields >> 2)                      # (BN, BG): one 2-bit field each
    p0 = fields & 3
    if NS == 2:
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))             # (BN, BG) each
        p1 = (fields >> 2) & 3
        zero = tl.zeros_like(v0)
        c0 = tl.where(p0 == 0, v0, zero)                                     # a group's column c holds the slot
        c1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))              # whose position is c, else 0
        c2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))              # (p0 < p1, so column 0 can only be
        c3 = tl.where(p1 == 3, v1, zero)                                     # p0's and column 3 only p1's)
    else:
        zero = tl.zeros_like(v)
        c0, c1, c2, c3 = (tl.where(p0 == 0, v, zero), tl.where(p0 == 1, v, zero), tl.where(p0 == 2, v, zero),
                          tl.where(p0 == 3, v, zero))
    # columns 0..3 of every group side by side: interleave is join + reshape, both in-thread
    return tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))     # (BN, BK)


@triton.jit
def _gather_rows(x_ptr, v_ptr, p_ptr, offs_m, m_ok, offs_n, n_ok, k_start, k_end, stride_xm, stride_xk,
                 stride_vn, stride_pn, row_bytes, NS: tl.constexpr, MS: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """``x @ W^T`` for rows ``offs_m`` x ``offs_n`` over K ``[k_start, k_end)`` without expanding W: each kept
    value is multiplied by ``x[:, its column]`` (a gather from x, which is a few KB and cache resident).

    Values are read as contiguous ``(BN, BLOCK_S)`` blocks (wide loads); products accumulate element-wise
    and are reduced once after the loop, so the loop has no cross-lane traffic. ``EVEN`` (every block
    full: N and this K range are multiples of the block) drops the bounds masks, a third of the loop's
    instructions. Returns ``(BM, BN)`` fp32.
    """
    BLOCK_S: tl.constexpr = BLOCK_K // MS * NS
    v_rows = v_ptr + offs_n[:, None].to(tl.int64) * stride_vn                   # (BN, 1)
    p_rows = p_ptr + offs_n[:, None].to(tl.int64) * stride_pn
    x_rows = x_ptr + offs_m[:, None, None].to(tl.int64) * stride_xm            # (BM, 1, 1)
    s_end = k_end // MS * NS
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_S), dtype=tl.float32)
    for s0 in range(k_start // MS * NS, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)                                           # (BS,) slot numbers
        if EVEN:
            vals = tl.load(v_rows + s[None, :])                                  # (BN, BS)
            if BITS == 2:  # m = 4: one byte holds 4 slots; load the block's bytes once and split them
                byte = tl.load(p_rows + (s0 // 4 + tl.arange(0, BLOCK_S // 4))[None, :])  # (BN, BS/4) uint8
                nib = tl.interleave(byte & 15, byte >> 4)                         # (BN, BS/2): slots 2j, 2j+1
                pos = tl.interleave(nib & 3, nib >> 2).to(tl.int32)               # (BN, BS)
            else:
                bit = s[None, :] * BITS
                word = tl.load(p_rows + bit // 8).to(tl.int32)
                if BITS == 3:  # a 3-bit field may straddle into the next byte (which may be past the row)
                    word = word | (tl.load(p_rows + bit // 8 + 1, mask=bit // 8 + 1 < row_bytes,
                                           other=0).to(tl.int32) << 8)
                pos = (word >> (bit % 8)) & (MS - 1)
            col = (s[None, :] // NS) * MS + pos                                  # (BN, BS) column in K
            if BLOCK_M == 1:  # grid rows = M: the row always exists
                xg = tl.load(x_rows + col[None, :, :].to(tl.int64) * stride_xk)
            else:
                xg = tl.load(x_rows + col[None, :, :].to(tl.int64) * stride_xk, mask=m_ok[:, None, None],
                             other=0.0)
        else:
            ok = n_ok[:, None] & (s < s_end)[None, :]                           # (BN, BS)
            vals = tl.load(v_rows + s[None, :], mask=ok, other=0.0)             # (BN, BS)
            pos = _decode_positions(p_rows, s[None, :], ok, row_bytes, BITS, MS)  # (BN, BS) in-group position
            col = (s[None, :] // NS) * MS + pos                                  # (BN, BS) column in K
            xg = tl.load(x_rows + col[None, :, :].to(tl.int64) * stride_xk,
                         mask=m_ok[:, None, None] & ok[None, :, :], other=0.0)
        acc += xg.to(tl.float32) * vals[None, :, :].to(tl.float32)              # (BM, BN, BS)
    return tl.sum(acc, axis=2)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "NS", "MS", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN": lambda a: (a["K_PER_SPLIT"] % a["BLOCK_K"] == 0 and a["K"] % a["BLOCK_K"] == 0
                                       and a["N"] % a["BLOCK_N"] == 0)})
@triton.jit
def _nm_matmul_kernel(
    x_ptr, v_ptr, p_ptr, b_ptr, y_ptr,
    M, N, K, K_PER_SPLIT, M_BUCKET, SPLIT_K,
    stride_xm, stride_xk, stride_vn, stride_pn, stride_ys, stride_ym,
    NS: tl.constexpr, NS_P2: tl.constexpr, MS: tl.constexpr, BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                         # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                         # (BN,)
    m_ok = offs_m < M
    n_ok = offs_n < N
    row_bytes = (K // MS * NS * BITS + 7) // 8
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    if GATHER:  # M <= 4: multiply each kept value by x at its column, no dense tile
        acc = _gather_rows(x_ptr, v_ptr, p_ptr, offs_m, m_ok, offs_n, n_ok, k_start, k_end, stride_xm, stride_xk,
                           stride_vn, stride_pn, row_bytes, NS, MS, BITS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN)
    else:  # expand a dense (BN, BK) tile per step and feed the tensor cores (BLOCK_M >= 16)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if MS == 4 and NS <= 2:
                w = _expand_m4(v_ptr, p_ptr, offs_n, n_ok, k0, k_end // 4, stride_vn, stride_pn, row_bytes, NS,
                               BLOCK_N, BLOCK_K, EVEN)                            # (BN, BK)
            else:
                w = _expand_slots(v_ptr, p_ptr, offs_n, n_ok, k0, k_end // MS, stride_vn, stride_pn, row_bytes,
                                  NS, NS_P2, MS, BITS, BLOCK_N, BLOCK_K)         # (BN, BK)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_ok = m_ok[:, None] if EVEN else m_ok[:, None] & (offs_k[None, :] < k_end)
            x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=x_ok, other=0.0)  # (BM, BK)
            if DOT_UPCAST:  # interpreter only: its bf16 tl.dot returns garbage (triton 3.9); fp32 is exact here
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    out_ok = m_ok[:, None] & n_ok[None, :]
    y_offs = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if PARTIAL:
        tl.store(y_ptr + pid_k.to(tl.int64) * stride_ys + y_offs, acc, mask=out_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def choose_split_k(m_rows: int, n_out: int, k_dim: int, m: int, num_sms: int) -> int:
    """How many K slices to run: 1 unless 16-row blocks of N leave SMs idle at decode sizes.

    Each slice keeps at least 256 dense K elements so that a slice still streams a useful amount.
    """
    if m_rows > 64:
        return 1
    programs = cdiv(n_out, 16)
    if programs >= num_sms:
        return 1
    return max(1, min(cdiv(2 * num_sms, programs), k_dim // 256, 16))


def _check(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
           bias: Optional[torch.Tensor], dtypes: tuple[torch.dtype, ...] = _DTYPES) -> tuple[int, int, int]:
    check_nm_params(n, m)
    for name, t in (("x", x), ("values", values), ("positions", positions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"x must be one of {[str(d) for d in dtypes]}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} must equal x dtype {x.dtype}")
    if positions.dtype != torch.uint8:
        raise TypeError(f"positions must be uint8, got {positions.dtype}")
    m_rows, k_dim = x.shape
    if values.dim() != 2 or positions.dim() != 2:
        raise ValueError(f"values and positions must be 2-D, got {tuple(values.shape)} and {tuple(positions.shape)}")
    n_out, slots = values.shape
    if k_dim % m or slots != k_dim // m * n:
        raise ValueError(f"x has K={k_dim}; {n}:{m} values need K % {m} == 0 and shape [N, {k_dim // m * n}], "
                         f"got values {tuple(values.shape)}")
    row_bytes = positions_row_bytes(slots, m)
    if tuple(positions.shape) != (n_out, row_bytes):
        raise ValueError(f"positions must have shape {(n_out, row_bytes)}, got {tuple(positions.shape)}")
    if not values.is_contiguous() or not positions.is_contiguous():
        raise ValueError("values and positions must be contiguous (pack them once; the kernel streams rows)")
    if bias is not None:
        if bias.shape != (n_out,) or bias.dtype != x.dtype or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous [{n_out}] {x.dtype} tensor, got "
                             f"{bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, values, positions) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return m_rows, n_out, k_dim


def _launch(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
            bias: Optional[torch.Tensor], split_k: int) -> torch.Tensor:
    m_rows, n_out, k_dim = x.shape[0], values.shape[0], x.shape[1]
    y = empty((m_rows, n_out), x.dtype, x.device)
    if m_rows == 0 or n_out == 0:
        return y
    if k_dim == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand_as(y))
    if split_k <= 0:
        split_k = choose_split_k(m_rows, n_out, k_dim, m, num_sms(x.device))
    # slices start on multiples of 32 (the m = 4 expansion reads whole position bytes), none empty
    k_per_split = cdiv(cdiv(k_dim, split_k), 32) * 32
    split_k = cdiv(k_dim, k_per_split)
    partial = split_k > 1
    out = empty((split_k, m_rows, n_out), torch.float32, x.device) if partial else y

    def grid(meta: dict) -> tuple[int, int, int]:
        return cdiv(n_out, meta["BLOCK_N"]), split_k, cdiv(m_rows, meta["BLOCK_M"])

    args = (x, values, positions, bias if bias is not None else values, out,
            m_rows, n_out, k_dim, k_per_split, _autotune_bucket(m_rows), split_k,
            x.stride(0), x.stride(1), values.stride(0), positions.stride(0),
            out.stride(0) if partial else 0, out.stride(-2))
    meta = dict(NS=n, NS_P2=next_pow2(n), MS=m, BITS=position_bits(m),
                HAS_BIAS=bias is not None, PARTIAL=partial,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                DOT_UPCAST=_INTERPRET and x.dtype == torch.bfloat16)
    if _INTERPRET:
        # Triton 3.6's autotuner benchmarks even a lone config, which needs a GPU driver: launch it directly.
        (cfg,) = _prune(_configs(), {"M_BUCKET": _autotune_bucket(m_rows), "MS": m, "NS": n})
        launch(_nm_matmul_kernel.fn, grid, *args, **meta, **cfg.kwargs)
    else:
        launch(_nm_matmul_kernel, grid, *args, **meta)
    if partial:
        acc = out.sum(0)  # fixed-order reduction of the fp32 partials: deterministic
        if bias is not None:
            acc += bias.float()
        y.copy_(acc)
    return y


@torch.library.custom_op("sparsecore::nm_matmul", mutates_args=())
def _nm_matmul_op(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                  bias: Optional[torch.Tensor] = None, split_k: int = 0) -> torch.Tensor:
    return _launch(x, values, positions, n, m, bias, split_k)


@_nm_matmul_op.register_fake
def _nm_matmul_fake(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                    bias: Optional[torch.Tensor] = None, split_k: int = 0) -> torch.Tensor:
    return x.new_empty((x.shape[0], values.shape[0]))


def nm_matmul(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
              bias: Optional[torch.Tensor] = None, split_k: int = 0) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T + bias`` with ``W`` given as N:M ``values [N, S]`` and ``positions``.

    ``split_k``: 0 chooses automatically (see ``choose_split_k``); >= 1 forces that many K slices.
    Pruned weights are absent, not zeros that multiply: the gather path (M <= 4) never reads ``x`` at a
    column whose weights are all pruned, so a non-finite ``x`` there may or may not reach ``y`` (the
    tensor-core path and ``nm_matmul_ref`` give NaN), depending on the autotuned path.
    Runs as the opaque custom op ``torch.ops.sparsecore.nm_matmul`` under torch.compile or autograd; eager
    inference calls the launcher directly.

    >>> p = NMWeight.from_dense(w, keep_n_of_m(w.abs(), 2, 4))
    >>> y = nm_matmul(x, p.values, p.positions, 2, 4)   # == F.linear(x, p.to_dense())
    """
    _check(x, values, positions, n, m, bias)
    if not isinstance(split_k, int) or split_k < 0:
        raise ValueError(f"split_k must be an int >= 0, got {split_k!r}")
    return _run(x, values, positions, n, m, bias, split_k)


def nm_matmul_prechecked(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``nm_matmul`` for a caller that validated the packed tensors once (``check_packed``) and keeps them.

    The TRITON_NM backend calls this: its module checks ``x``'s dtype and device per (dtype, device) and
    its last dim on every call. Still checked here, because a wrong value would make the kernel read out
    of bounds: ``x`` is 2-D with the weight's K, and ``bias`` (a parameter a user may replace) has shape
    ``[N]``, ``x``'s dtype and unit stride. Anything off gets ``nm_matmul``'s full check and message.
    """
    if (x.dim() != 2 or x.shape[1] * n != values.shape[1] * m or x.dtype != values.dtype
            or (bias is not None and (bias.shape != values.shape[:1] or bias.dtype != x.dtype or bias.stride(0) != 1
                                      or bias.device != values.device))):
        _check(x, values, positions, n, m, bias)
    return _run(x, values, positions, n, m, bias, 0)


def check_packed(values: torch.Tensor, positions: torch.Tensor, n: int, m: int) -> None:
    """Validate the packed tensors alone (what ``nm_matmul_prechecked`` relies on); raises like ``nm_matmul``."""
    check_nm_params(n, m)
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a 2-D tensor, got {type(values).__name__} "
                         f"{tuple(getattr(values, 'shape', ()))}")
    if values.shape[1] % n:
        raise ValueError(f"n must divide values' {values.shape[1]} slots, got n={n}")
    k_dim = values.shape[1] // n * m
    _check(values.new_empty((0, k_dim)), values, positions, n, m, None)
    n_out, slots = values.shape
    if n_out and slots and n > 1:  # canonical form: each group's positions strictly increasing
        chunk = max(1, (1 << 22) // positions.shape[1])  # rows per step: bounds the unpacking temporaries
        for r0 in range(0, n_out, chunk):
            pos = unpack_positions(positions[r0: r0 + chunk], slots, m).reshape(-1, slots // n, n)
            bad = (pos[..., 1:] <= pos[..., :-1]).any(-1)
            if bool(bad.any()):
                r, g = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"positions of row {r0 + r}, group {g} are not strictly increasing: "
                                 f"{pos[r, g].tolist()} (not the NMWeight canonical form)")


def _run(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
         bias: Optional[torch.Tensor], split_k: int) -> torch.Tensor:
    if needs_op(x, bias):
        return torch.ops.sparsecore.nm_matmul(x, values, positions, n, m, bias, split_k)
    return _launch(x, values, positions, n, m, bias, split_k)


def nm_matmul_ref(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch ``nm_matmul`` on the same packed inputs (CPU fallback and benchmark provider).

    Computes in fp32 for half inputs (float64 stays float64) and returns ``x``'s dtype.
    """
    _check(x, values, positions, n, m, bias, _DTYPES + (torch.float64,))
    n_out, slots = values.shape
    groups = slots // n
    pos = unpack_positions(positions, slots, m).reshape(n_out, groups, n)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.zeros(n_out, groups, m, dtype=cdt, device=values.device)
    w.scatter_(-1, pos, values.reshape(n_out, groups, n).to(cdt))
    y = x.to(cdt) @ w.reshape(n_out, groups * m).t()
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)


def compile_spec(kw: dict, *, n: int = 2, m: int = 4, even: bool = True, dtype: str = "*fp16") -> tuple:
    """Launch spec of config ``kw`` (BLOCK_M/N/K, GATHER) for ``n:m``, as ``_launch`` calls the kernel:
    ``(kernel, signature, constexprs, args Triton may assume divisible by 16)`` for
    ``sparsecore.compile_check``. ``even``: whole tiles (sizes and strides divisible by 16, no masks)."""
    fn = _nm_matmul_kernel.fn.fn  # autotuner -> heuristics -> kernel
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": dtype, "v_ptr": dtype, "p_ptr": "*u8", "b_ptr": dtype,
                                              "y_ptr": dtype}
    const = dict(stride_xk=1, stride_ys=0, SPLIT_K=1, NS=n, NS_P2=next_pow2(n), MS=m, BITS=position_bits(m), HAS_BIAS=True,
                 PARTIAL=False, DOT_PRECISION="tf32", DOT_UPCAST=False, EVEN=even, **kw)
    aligned = ["x_ptr", "v_ptr", "p_ptr", "b_ptr", "y_ptr"]
    if even:
        aligned += ["N", "K", "K_PER_SPLIT", "stride_xm", "stride_vn", "stride_pn", "stride_ym"]
    return fn, sig, const, aligned
