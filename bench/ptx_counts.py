"""Offline kernel check, no GPU needed: ``python -m bench.ptx_counts [--arch 90] [--out-dir DIR]``.

Compiles the decode configurations of the sparse kernels for an NVIDIA target with Triton's own ptxas
and reports, per configuration: registers, spill bytes, and the number of PTX instructions in the main
loop per weight element it processes (per *kept* value for ``sell_matmul``), all of them and the integer
ones (integer/logic/compare/select). At decode sizes a kernel must stream its compressed weight at memory
speed. An H100 SXM (132 SMs, ~1.98 GHz) issues ~33 T thread-instructions/s, of which only ~17 T can be
integer (64 INT32 lanes per SM against 128 FP32), against ~3 TB/s of DRAM: a 2:4 fp16 weight (1.125 B per
element) leaves ~12 instructions and ~6 integer ones per element before issue, not DRAM, is the limit.
The counts are a proxy (PTX, not SASS; no latency, no caches, no special-function rates), a way to compare
variants before a GPU session measures them, not a performance claim.

Writes ``bench/results/ptx_counts_sm<arch>_triton<version>.{csv,md}``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .common import RESULTS, bench_parser

_ALIGNED = "tt.divisibility"


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, aligned: list[str], arch: int,
                   num_warps: int, num_stages: int) -> dict:
    """Compile ``fn`` (a JITFunction) for ``sm_<arch>``; returns registers, spills and the main loop's counts."""
    if not isinstance(fn, triton.runtime.JITFunction):  # imported under TRITON_INTERPRET=1: recompile its source
        fn = triton.runtime.JITFunction(fn.fn)
    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    attrs = {(names.index(n),): [[_ALIGNED, 16]] for n in aligned}
    log = io.StringIO()
    # ptxas -v prints registers and spills, and only when it runs: compile into a fresh cache every time.
    env = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="ptx_counts_")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    ptx = compiled.asm["ptx"]
    loop = max(_loop_bodies(ptx), key=len, default=[])
    kinds = Counter(_opcode(line) for line in loop)
    return {"regs": int(regs[-1]) if regs else "", "spill_bytes": int(spill[-1]) if spill else "",
            "loop_instr": len(loop), "loop_int": sum(map(_is_integer_op, loop)), "tensor_core": bool(re.search(r"\b(w?gmma|mma)\.", ptx)),
            "top_ops": " ".join(f"{k}:{v}" for k, v in kinds.most_common(6))}


_INT_OPS = {"add", "sub", "mul", "mad", "and", "or", "xor", "not", "shl", "shr", "setp", "selp", "min", "max", "popc",
            "bfe", "bfi", "prmt", "lop3", "neg", "abs"}


def _is_integer_op(line: str) -> bool:
    """An integer/logic/compare/select instruction: on H100 these share 64 lanes per SM per clock (FP32 has 128)."""
    parts = line.split()
    full = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    op, *suffixes = full.split(".")
    return op in _INT_OPS and not any(t in ("f16", "f16x2", "bf16", "bf16x2", "f32", "f64") for t in suffixes)


def _row(kernel: str, path: str, config: str, rows_m: int, unit: str, per_thread: float, res: dict) -> dict:
    """One table row; ``per_thread``: units (weight elements or kept values) one thread handles per iteration."""
    return {"kernel": kernel, "path": path, "config": config, "rows_M": rows_m, "unit": unit,
            "instr_per_unit": round(res["loop_instr"] / per_thread, 1),
            "int_per_unit": round(res["loop_int"] / per_thread, 1), **res}


def _opcode(line: str) -> str:
    parts = line.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


def _loop_bodies(ptx: str) -> list[list[str]]:
    """Instruction lines between a label and a later branch back to it."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\$L__\w+:", line)}
    bodies = []
    for i, line in enumerate(lines):
        m = re.match(r"^(@%p\d+\s+)?bra(\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(3), i) < i:
            bodies.append([x for x in lines[labels[m.group(3)]:i]
                           if x and not x.startswith(("$", "//", "{", "}", "."))])
    return bodies


# Launch specs: (kernel, signature, constexprs, args Triton may assume divisible by 16) of one config, as the
# launchers call it. Shared with bench.compile_check, so a change to a kernel's arguments is made once.

def nm_spec(kw: dict, *, n: int = 2, m: int = 4, even: bool = True, dtype: str = "*fp16") -> tuple:
    """``nm_matmul`` config ``kw`` (BLOCK_M/N/K, GATHER) for n:m; ``even``: whole tiles (no masks)."""
    import sparsecore.kernels.nm_matmul as mod
    fn = mod._nm_matmul_kernel.fn.fn  # autotuner -> heuristics -> kernel
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": dtype, "v_ptr": dtype, "p_ptr": "*u8", "b_ptr": dtype,
                                              "y_ptr": dtype}
    const = dict(stride_xk=1, stride_ys=0, SPLIT_K=1, NS=n, NS_P2=1 << (n - 1).bit_length(), MS=m,
                 BITS={4: 2, 8: 3}[m], HAS_BIAS=True, PARTIAL=False, DOT_PRECISION="tf32", DOT_UPCAST=False,
                 EVEN=even, **kw)
    aligned = ["x_ptr", "v_ptr", "p_ptr", "b_ptr", "y_ptr"]
    if even:  # whole tiles: sizes and strides divisible by 16, as Triton specialises them at launch
        aligned += ["N", "K", "K_PER_SPLIT", "stride_xm", "stride_vn", "stride_pn", "stride_ym"]
    return fn, sig, const, aligned


def sell_spec(kw: dict) -> tuple:
    """``sell_matmul`` config ``kw`` (BLOCK_M, BLOCK_J), 16-row slices: M = 1 reads x as given (unit K
    stride), M > 1 the launcher's x^T padded to 16 rows (unit M stride)."""
    import sparsecore.kernels.sell_matmul as mod
    fn = mod._sell_matmul_kernel.fn
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": "*fp16", "v_ptr": "*fp16", "c_ptr": "*i16", "len_ptr": "*i32",
                                              "base_ptr": "*i64", "width_ptr": "*i32", "b_ptr": "*fp16",
                                              "y_ptr": "*fp16"}
    one_row = kw["BLOCK_M"] == 1
    const = dict(M=1, M_BUCKET=1, stride_xk=1) if one_row else dict(stride_xm=1)
    const.update(C=16, ALIGN_=16, HAS_BIAS=True, **kw)
    aligned = ["x_ptr", "v_ptr", "c_ptr", "len_ptr", "base_ptr", "width_ptr", "b_ptr", "y_ptr", "N", "K",
               "stride_xm" if one_row else "stride_xk", "stride_ym"]
    return fn, sig, const, aligned


def spmm_spec(block_m: int, tile_n: int, tile_k: int) -> tuple:
    """``spmm`` on whole K tiles of ``tile_n x tile_k``, ``block_m`` rows per program (M = 1 when 1)."""
    import sparsecore.kernels.spmm as mod
    fn = mod._spmm_kernel
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


def nm_rows(arch: int) -> list[dict]:
    import sparsecore.kernels.nm_matmul as mod
    rows = []
    for cfg in mod._configs():
        kw = cfg.kwargs
        if kw["BLOCK_M"] > 16:
            continue  # prefill tiles: compute bound, cuSPARSELt's territory
        fn, sig, const, aligned = nm_spec(kw)
        if kw["BLOCK_M"] == 1:
            const["M"] = 1
        res = compile_kernel(fn, sig, const, aligned, arch, cfg.num_warps, cfg.num_stages)
        per_thread = kw["BLOCK_N"] * kw["BLOCK_K"] / (32 * cfg.num_warps)
        rows.append(_row("nm_matmul 2:4 fp16", "gather" if kw["GATHER"] else "tensor cores",
                         f"BM={kw['BLOCK_M']} BN={kw['BLOCK_N']} BK={kw['BLOCK_K']} w={cfg.num_warps}",
                         kw["BLOCK_M"] if kw["GATHER"] else 16, "dense weight element", per_thread, res))
    return rows


def sell_rows(arch: int) -> list[dict]:
    import sparsecore.kernels.sell_matmul as mod
    rows = []
    for cfg in mod._configs():
        kw = cfg.kwargs
        # the configs the autotuner may try for M = 1, 4 and 16 (see mod._prune)
        if kw["BLOCK_M"] not in (1, 4, 16) or kw["BLOCK_M"] * 16 * kw["BLOCK_J"] > min(
                mod._MAX_TILE, 32 * cfg.num_warps * mod._MAX_PER_THREAD):
            continue
        res = compile_kernel(*sell_spec(kw), arch, cfg.num_warps, cfg.num_stages)
        per_thread = 16 * kw["BLOCK_J"] / (32 * cfg.num_warps)
        rows.append(_row("sell_matmul fp16", "per kept value",
                         f"BM={kw['BLOCK_M']} C=16 BJ={kw['BLOCK_J']} w={cfg.num_warps}", kw["BLOCK_M"],
                         "kept value", per_thread, res))
    return rows


def spmm_rows(arch: int) -> list[dict]:
    rows = []
    for block_m, tile_n, tile_k, warps in ((1, 32, 128, 4), (1, 32, 128, 8), (1, 16, 256, 4), (2, 32, 128, 4),
                                           (4, 32, 128, 8), (16, 32, 128, 4), (16, 16, 256, 4), (64, 32, 128, 4)):
        res = compile_kernel(*spmm_spec(block_m, tile_n, tile_k), arch, warps, 2)
        per_thread = tile_n * tile_k / (32 * warps)
        rows.append(_row("spmm (bitmap) fp16", "tensor cores" if block_m >= 16 else "popcount decode",
                         f"BM={block_m} tile {tile_n}x{tile_k} w={warps}", block_m, "dense weight element",
                         per_thread, res))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("bench.ptx_counts", __doc__.splitlines()[0], "no effect (the run takes ~1 minute)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    rows = nm_rows(args.arch) + sell_rows(args.arch) + spmm_rows(args.arch)
    for r in rows:
        print(f"{r['kernel']:20s} {r['path']:18s} {r['config']:28s} M={r['rows_M']:<3d} {r['instr_per_unit']:6.1f} "
              f"instr ({r['int_per_unit']:5.1f} int)/{r['unit']:22s} regs {r['regs']} spill {r['spill_bytes']} B  [{r['top_ops']}]")
    out = Path(args.out_dir) if args.out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ptx_counts_sm{args.arch}_triton{triton.__version__}"
    cols = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    stem.with_suffix(".md").write_text(f"Offline PTX counts (no GPU): `python -m bench.ptx_counts --arch {args.arch}`, "
                                       f"triton {triton.__version__}\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
