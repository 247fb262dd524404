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

import csv
import os
from pathlib import Path

import triton

from sparsecore.compile_check import compile_kernel
from sparsecore.kernels.nm_matmul import compile_spec as nm_spec
from sparsecore.kernels.sell_matmul import compile_spec as sell_spec
from sparsecore.kernels.spmm import compile_spec as spmm_spec

from .common import RESULTS, bench_parser

def _row(kernel: str, path: str, config: str, rows_m: int, unit: str, per_thread: float, res: dict) -> dict:
    """One table row; ``per_thread``: units (weight elements or kept values) one thread handles per iteration."""
    return {"kernel": kernel, "path": path, "config": config, "rows_M": rows_m, "unit": unit,
            "instr_per_unit": round(res["loop_instr"] / per_thread, 1),
            "int_per_unit": round(res["loop_int"] / per_thread, 1), **res}


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
