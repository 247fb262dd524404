"""spmm: ``y = x @ W^T + bias`` with W in the tiled-bitmap unstructured format.

W ``[N, K]`` is given by the packed tensors of ``sparsecore.formats.unstructured`` (see its docstring
for the byte layout): ``bitmap`` int32 ``[TN, TK, tile_n, tile_k // 32]``, ``values`` ``[nnz]`` and
``tile_offsets`` int32 ``[TN * TK + 1]``.

Work split. Program ``(i, s, b)`` owns output columns ``i*tile_n ..`` (one tile row of W), the ``s``-th
of ``SPLIT_K`` contiguous chunks of that tile row's K tiles, and rows ``b*BLOCK_M ..`` of x. For every
tile it reads the tile's bitmap words once and gathers each entry's value from the tile's contiguous run:
shifting bit j of its word to the top, the sign says whether the entry is kept and the popcount gives its
slot (plus the tile's offset and a scan of the tile's word popcounts, once per 32 entries); one ``popc``
per entry, the SWAR formula under the interpreter. Decode (M <= 2) accumulates element-wise products in
registers and reduces once at the end; from M = 3 up ``tl.dot`` runs on a 16/32/64 row block.
``SPLIT_K > 1`` gives enough programs at M = 1 (N = 4096 has only 256 tile rows for 132 SMs) and
accumulates fp32 partials with atomics into a zeroed workspace that is cast once at the end.

Cost: a fixed number of instructions per *dense* weight element, so the work does not shrink with
sparsity: at high sparsity the TRITON_SELL backend (work per kept value) is the faster decode; below that
this kernel's bytes win, and the planner measures where the crossover lies. Instructions per element per
path: ``bench/results/ptx_counts_sm90_triton*.md`` (``python -m bench.ptx_counts``).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sparsecore.formats.unstructured import MAX_TILE_ELEMS, TILE_K_CHOICES, TILE_N_CHOICES, decode_matrix

from ._host import (cdiv, cpu_launch_ok, empty, interpreting, launch, launched_config, needs_op, next_pow2,
                    sparsity_bucket)

__all__ = ["spmm", "spmm_prechecked", "check_packed", "spmm_ref"]

_INTERPRET = interpreting()  # fixed at import, as triton.jit fixes it
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _popcount(v, HW_POPC: tl.constexpr):
    """Set bits of each uint32, as int32: the hardware instruction on a GPU (one popc.b32 on NVIDIA), the SWAR
    formula under the interpreter (which has no libdevice). LLVM turns the formula into popc only sometimes
    (triton 3.9 mostly, 3.6 rarely), so the GPU does not rely on it."""
    if HW_POPC:
        return libdevice.popc(v.to(tl.int32, bitcast=True))
    else:
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit(do_not_specialize=["sparsity_key"])  # an autotuning key only: no compile per value
def _spmm_kernel(
    x_ptr, bitmap_ptr, values_ptr, offsets_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, n_k_tiles, m_bucket, sparsity_key,
    stride_xm, stride_xk, stride_om,
    HAS_BIAS: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, HW_POPC: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    WORDS: tl.constexpr = TILE_K // 32

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                     # (BM,)
    rm64 = rm.to(tl.int64)                                           # M * N or M * K may pass 2^31
    rn = tl.arange(0, TILE_N)                                        # (TN,)
    rw = tl.arange(0, WORDS)                                         # (W,)
    rj = tl.arange(0, 32)                                            # bit j of a word = column w*32 + j
    word_offs = rn[:, None] * WORDS + rw[None, :]                    # (TN, W) inside one tile's bitmap
    col3 = rw[:, None] * 32 + rj[None, :]                            # (W, 32) column inside the tile

    per_split = tl.cdiv(n_k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_k_tiles)
    if BLOCK_M >= 16:
        acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    else:
        acc4 = tl.zeros((BLOCK_M, TILE_N, WORDS, 32), dtype=tl.float32)
    for t in range(t_begin, t_end):
        tile = pid_n * n_k_tiles + t
        words = tl.load(bitmap_ptr + tile.to(tl.int64) * (TILE_N * WORDS) + word_offs).to(tl.uint32, bitcast=True)
        # Slot of entry (r, w, j) in the tile's run of values: the tile's offset, plus the kept entries of
        # the words before (r, w) (row-major), plus the kept bits before j in its own word. One popcount per
        # entry and one scan per word; no scan per entry.
        count = _popcount(words, HW_POPC)                                                          # (TN, W)
        flat = tl.reshape(count, (TILE_N * WORDS,))
        word_base = tl.reshape(tl.cumsum(flat, axis=0) - flat, (TILE_N, WORDS)) + tl.load(offsets_ptr + tile)
        # Shift bit j of each word to the top: its sign says whether entry j is kept, and its popcount
        # counts the kept entries up to and including j (so the slot is one less, plus the word's base).
        top = words[:, :, None] << (31 - rj.to(tl.uint32))[None, None, :]                  # (TN, W, 32)
        slot = (word_base - 1)[:, :, None] + _popcount(top, HW_POPC)
        v = tl.load(values_ptr + slot, mask=top.to(tl.int32, bitcast=True) < 0, other=0.0)

        kk = t * TILE_K + col3                                                            # (W, 32)
        if BLOCK_M >= 16:
            kk2 = tl.reshape(kk, (TILE_K,))
            x_ok = rm[:, None] < M
            if not EVEN_K:
                x_ok = x_ok & (kk2[None, :] < K)
            x = tl.load(x_ptr + rm64[:, None] * stride_xm + kk2[None, :] * stride_xk, mask=x_ok,
                        other=0.0)                                                        # (BM, TK)
            w = tl.reshape(v, (TILE_N, TILE_K))
            if DOT_UPCAST:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
            else:
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        else:
            # Decode: element-wise products accumulate in registers, reduced once after the loop (a dot
            # would pad M to 16; a reduction per tile would cost shuffles every iteration).
            x_ok = rm[:, None, None] < M
            if not EVEN_K:
                x_ok = x_ok & (kk[None, :, :] < K)
            x = tl.load(x_ptr + rm64[:, None, None] * stride_xm + kk[None, :, :] * stride_xk, mask=x_ok,
                        other=0.0)                                                        # (BM, W, 32)
            acc4 += x[:, None, :, :].to(tl.float32) * v[None, :, :, :].to(tl.float32)
    if BLOCK_M < 16:
        acc = tl.sum(tl.sum(acc4, axis=3), axis=2)

    cols = pid_n * TILE_N + rn
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]                 # added by one split only
    out_mask = (rm[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptr + rm64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(ws_ptr + rm64[:, None] * N + cols[None, :], acc, mask=out_mask)


def _zero_workspace(nargs: dict) -> None:
    if nargs["SPLIT_K"] > 1:
        nargs["ws_ptr"].zero_()


# Decode accumulators (BLOCK_M x tile, fp32) per thread above which a config costs occupancy or spills.
_MAX_ACC_PER_THREAD = 64


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # More splits than K tiles only adds empty programs and atomics.
    args = {**named_args, **kwargs}
    kept = [c for c in configs if c.kwargs["SPLIT_K"] <= max(1, args["n_k_tiles"])] or configs[:1]
    if args["BLOCK_M"] < 16:
        # The decode path holds BLOCK_M x tile fp32 accumulators across the threads: more than
        # _MAX_ACC_PER_THREAD costs occupancy (over 200 registers) or spills; keep the configs with the fewest.
        acc = args["BLOCK_M"] * args["TILE_N"] * args["TILE_K"]
        per_thread = {c: acc // (32 * c.num_warps) for c in kept}
        least = max(_MAX_ACC_PER_THREAD, min(per_thread.values()))
        kept = [c for c in kept if per_thread[c] <= least]
    return kept


def _configs(interpret: bool = _INTERPRET) -> list[triton.Config]:
    if interpret:  # the interpreter is slow and cannot time anything: one config
        return [triton.Config({"SPLIT_K": 1}, num_warps=4, num_stages=1, pre_hook=_zero_workspace)]
    return [triton.Config({"SPLIT_K": s}, num_warps=w, num_stages=st, pre_hook=_zero_workspace)
            for s in (1, 2, 4, 8) for w in (4, 8) for st in (2, 3)]


_spmm_autotuned = triton.autotune(configs=_configs(), key=["m_bucket", "sparsity_key", "N", "K", "HAS_BIAS", "BLOCK_M",
                                                           "TILE_N", "TILE_K"],
                                  prune_configs_by={"early_config_prune": _prune})(_spmm_kernel)


def _block_m(m: int) -> int:
    """Rows per program: 1-2 decode in registers; from 3 rows a 16-row tensor-core block takes fewer
    instructions per element than a 4-row register decode, which also needs 8 warps to hold its
    accumulators (``bench/results/ptx_counts_sm90_triton*.md``, the 4-row and 16-row spmm rows)."""
    if m <= 2:
        return m
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def _autotune_bucket(m: int, block_m: int) -> int:
    """Power-of-two count of row blocks: the autotuner keys on it (not on every distinct M)."""
    return next_pow2(cdiv(m, block_m))


def _check(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
           bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("bitmap", bitmap), ("values", values), ("tile_offsets", tile_offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"spmm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"spmm: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"spmm: x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if values.dtype != x.dtype or values.dim() != 1:
        raise TypeError(f"spmm: values must be 1-D {x.dtype} (x's dtype), got {values.dtype} {tuple(values.shape)}")
    if bitmap.dtype != torch.int32 or bitmap.dim() != 4:
        raise TypeError(f"spmm: bitmap must be int32 [TN, TK, tile_n, tile_k/32], got {bitmap.dtype} {tuple(bitmap.shape)}")
    tn, tk, tile_n, words = bitmap.shape
    if tile_n not in TILE_N_CHOICES or 32 * words not in TILE_K_CHOICES or tile_n * 32 * words > MAX_TILE_ELEMS:
        raise ValueError(f"spmm: bitmap tile {tile_n} x {32 * words} not in {TILE_N_CHOICES} x {TILE_K_CHOICES} "
                         f"with at most {MAX_TILE_ELEMS} entries")
    k = x.shape[1]
    if not isinstance(n, int) or n < 0 or -(-n // tile_n) != tn:
        raise ValueError(f"spmm: n={n!r} does not match bitmap's {tn} tile rows of {tile_n}")
    if -(-k // (32 * words)) != tk:
        raise ValueError(f"spmm: x has K={k}, bitmap has {tk} tile columns of {32 * words}")
    if tile_offsets.dtype != torch.int32 or tuple(tile_offsets.shape) != (tn * tk + 1,):
        raise TypeError(f"spmm: tile_offsets must be int32 [{tn * tk + 1}], got {tile_offsets.dtype} "
                        f"{tuple(tile_offsets.shape)}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"spmm: bias must be {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    tensors = [("bitmap", bitmap), ("values", values), ("tile_offsets", tile_offsets)]
    if bias is not None:
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"spmm: {name} is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"spmm: {name} must be contiguous (pack it once, do not pass views)")
    if not (x.is_cuda or (cpu_launch_ok(_INTERPRET) and x.device.type == "cpu")):
        raise ValueError(f"spmm: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), x is on {x.device}")


def _launch(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
            bias: torch.Tensor | None, split_k: int) -> torch.Tensor:
    m, k = x.shape
    _, n_k_tiles, tile_n, words = bitmap.shape
    out = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    ws = empty((m, n), torch.float32, x.device)
    sparsity = sparsity_bucket(values.numel(), n * k)
    if values.numel() == 0:  # 100% sparse: every load is masked, but give the kernel a valid pointer
        values = torch.zeros(1, dtype=x.dtype, device=x.device)
    block_m = _block_m(m)
    # Triton 3.9's interpreter mis-computes bf16 tl.dot (it multiplies the raw bits); on CPU the bf16
    # tiles go through an exact fp32 dot instead. GPUs always take the native bf16 dot.
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    args = (x, bitmap, values, tile_offsets, bias if bias is not None else out, out, ws,
            m, n, k, n_k_tiles, _autotune_bucket(m, block_m), sparsity, x.stride(0), x.stride(1), out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, TILE_N=tile_n, TILE_K=32 * words, BLOCK_M=block_m,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else None, DOT_UPCAST=upcast,
                HW_POPC=not _INTERPRET, EVEN_K=k % (32 * words) == 0)  # whole K tiles: no K mask on x
    tile_rows, m_blocks = bitmap.shape[0], cdiv(m, block_m)
    grid = lambda cfg: (tile_rows, cfg["SPLIT_K"], m_blocks)  # noqa: E731
    if split_k > 0:
        if split_k > 1:
            ws.zero_()
        # the warps _prune would leave: 8 where 4 would hold too many decode accumulators per thread
        warps = 8 if block_m < 16 and block_m * tile_n * 32 * words > _MAX_ACC_PER_THREAD * 32 * 4 else 4
        launch(_spmm_kernel, grid, *args, SPLIT_K=split_k, num_warps=warps, **meta)
        used = split_k
    else:
        launch(_spmm_autotuned, grid, *args, **meta)
        used = launched_config(_spmm_autotuned)["SPLIT_K"]
    if used > 1:
        out.copy_(ws)
    return out


@torch.library.custom_op("sparsecore::spmm", mutates_args=())
def _spmm_op(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
             bias: torch.Tensor | None = None, split_k: int = 0) -> torch.Tensor:
    _check(x, bitmap, values, tile_offsets, n, bias)
    return _launch(x, bitmap, values, tile_offsets, n, bias, split_k)


@_spmm_op.register_fake
def _spmm_fake(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
               bias: torch.Tensor | None = None, split_k: int = 0) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


def spmm(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
         bias: torch.Tensor | None = None, *, split_k: int | None = None, k: int | None = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T + bias [N]`` with W packed as ``UnstructuredWeight`` tensors.

    fp16, bf16 or fp32 (values, x and bias share the dtype); fp32 accumulation. ``x`` may have any
    strides; packed tensors must be contiguous and on x's device. ``split_k`` forces the number of K
    chunks (``None``: autotuned per (M block, sparsity bucket, N, K)). ``k``: the weight's K
    (``p.shape[1]``); pass it, since the bitmap alone fixes K only up to a whole tile, so without it an ``x``
    whose K differs from the weight's but needs as many tiles is multiplied by the weight zero-extended (or
    cut) to that K.
    Runs as the opaque op ``torch.ops.sparsecore.spmm`` under torch.compile or autograd.

    >>> p = UnstructuredWeight.from_dense(w, mask)                                  # w: (N, K) on CUDA
    >>> y = spmm(x, p.bitmap, p.values, p.tile_offsets, p.n, bias, k=p.shape[1])   # (M, N)
    """
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"spmm: split_k must be a positive int or None, got {split_k!r}")
    if k is not None and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] != k:
        raise ValueError(f"spmm: x must be [M, {k}] (the weight's K), got {tuple(x.shape)}")
    if needs_op(x, bias):  # the op runs the full check itself
        return torch.ops.sparsecore.spmm(x, bitmap, values, tile_offsets, n, bias, split_k or 0)
    _check(x, bitmap, values, tile_offsets, n, bias)
    return _launch(x, bitmap, values, tile_offsets, n, bias, split_k or 0)


def check_packed(bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int, k: int) -> None:
    """Validate the packed tensors of an ``[n, k]`` weight alone (what ``spmm_prechecked`` relies on)."""
    if not isinstance(values, torch.Tensor) or not isinstance(k, int) or k < 0:
        raise TypeError(f"spmm: values must be a tensor and k an int >= 0, got {type(values).__name__}, k={k!r}")
    _check(values.new_empty((0, k)), bitmap, values, tile_offsets, n, None)


def spmm_prechecked(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor,
                    n: int, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``spmm`` of an ``[n, k]`` weight whose packed tensors were validated once (``check_packed``).

    The TRITON_SPMM backend calls this; its module checks ``x``'s dtype, device and last dim. Still checked
    here, since a wrong value would read out of bounds or mean another product: ``x`` 2-D ``[M, k]`` in
    the values' dtype, and ``bias`` (a parameter a user may replace) ``[n]`` of ``x``'s dtype with unit
    stride. Anything off gets the full check and its message.
    """
    if (x.dim() != 2 or x.shape[1] != k or x.dtype != values.dtype
            or (bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.stride(0) != 1
                                      or bias.device != values.device))):
        if x.dim() == 2 and x.shape[1] != k:
            raise ValueError(f"spmm: x must be [M, {k}] (the weight's K), got {tuple(x.shape)}")
        _check(x, bitmap, values, tile_offsets, n, bias)
    if needs_op(x, bias):
        return torch.ops.sparsecore.spmm(x, bitmap, values, tile_offsets, n, bias, 0)
    return _launch(x, bitmap, values, tile_offsets, n, bias, 0)


def spmm_ref(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, n: int,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``spmm`` on the same packed inputs: decode W, then an fp32 matmul. Any device.

    ``tile_offsets`` is implied by the bitmap (it is validated when the weight is loaded), so the
    reference decodes from the bitmap's order alone.
    """
    _check_ref(x, bitmap, values, n)
    w = decode_matrix(bitmap, values, n, x.shape[1])                  # (N, K)
    y = x.float() @ w.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def _check_ref(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, n: int) -> None:
    if x.dim() != 2 or x.dtype != values.dtype:
        raise ValueError(f"spmm_ref: x must be 2-D with values' dtype {values.dtype}, got {x.dtype} {tuple(x.shape)}")
    tk, tile_k = bitmap.shape[1], 32 * bitmap.shape[3]
    if -(-x.shape[1] // tile_k) != tk or -(-n // bitmap.shape[2]) != bitmap.shape[0]:
        raise ValueError(f"spmm_ref: x [M, {x.shape[1]}] and n={n} do not match bitmap {tuple(bitmap.shape)}")


def compile_spec(block_m: int, tile_n: int, tile_k: int) -> tuple:
    """Launch spec on whole K tiles of ``tile_n x tile_k`` with ``block_m`` rows per program (M = 1 when 1),
    as ``_launch`` calls the kernel: ``(kernel, signature, constexprs, args divisible by 16)`` for
    ``sparsecore.compile_check``."""
    fn = _spmm_kernel
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": "*fp16", "bitmap_ptr": "*i32", "values_ptr": "*fp16",
                                              "offsets_ptr": "*i32", "bias_ptr": "*fp16", "out_ptr": "*fp16",
                                              "ws_ptr": "*fp32"}
    const = dict(stride_xk=1, HAS_BIAS=True, TILE_N=tile_n, TILE_K=tile_k, BLOCK_M=block_m, SPLIT_K=1,
                 DOT_PRECISION=None, DOT_UPCAST=False, HW_POPC=True, EVEN_K=True)
    if block_m == 1:
        const.update(M=1, m_bucket=1)
    aligned = ["x_ptr", "bitmap_ptr", "values_ptr", "offsets_ptr", "bias_ptr", "out_ptr", "ws_ptr", "N", "K",
               "n_k_tiles", "stride_xm", "stride_om"]
    return fn, sig, const, aligned
