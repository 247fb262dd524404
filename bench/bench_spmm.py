"""Kernel benchmark: unstructured sparse weight x dense activations, every provider in one run.

    python -m bench.bench_spmm [--quick] [--out-dir DIR]

GPU (fp16): weights [N, K] = 4096x4096, 11008x4096, 4096x11008 (LLaMA-class) and 768x3072 (BERT-base
FFN down), M in {1, 4, 16, 64, 256}, random unstructured masks at 50/70/90/95% sparsity. Providers:
dense F.linear (cuBLAS), dense under torch.compile, torch CSR (cuSPARSE), torch BSR Triton
(``torch.sparse._triton_ops.bsr_dense_mm``, 16x16 blocks), sparsecore Triton ``spmm`` on the tiled bitmap
(``sparsecore_triton``) and ``sell_matmul`` on the sliced-ELL layout (``sparsecore_sell``; both autotuned,
the tuning runs in the warm-up, not in the timed loop) and the torch reference. ``--quick``: 4096x4096,
M in {1, 16}, 50 and 90%. ``--shapes 4096x4096,11008x4096``, ``--ms 1,16``, ``--sparsities 50,70,90,95`` and
``--providers dense,sparsecore_triton,...`` pick the cases (on any device); the table is rewritten after
every case, and a provider that raises (or does not apply) gets a row with the reason in ``error``; the
bench exits 1 when one of sparsecore's own providers raised.
CPU (fp32, tiny): dense F.linear vs torch CSR (MKL) vs the reference, just to prove the command runs;
GPU-only providers are skipped with the reason printed.

Columns (vocabulary in ``bench.common``): ``time_ms`` (median; ``do_bench`` on CUDA),
``best_dense_time_ms`` and ``speedup_vs_best_dense`` (best dense provider of the same run),
``GB_per_s`` (weight bytes as stored by the provider + x + y, over the median time) and
``pct_of_copy_bw`` (its share of the device's measured copy bandwidth), ``TFLOP_per_s``
(dense-equivalent 2 M N K) and ``useful_TFLOP_per_s`` (2 M nnz), ``weight_bytes_per_dense_elem``, and
``max_abs_err`` against an fp32 dense product (a wrong kernel shows here).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sparsecore.formats import UnstructuredWeight

from .common import (NOT_RUN, Table, bench_parser, env_info, error_row, failed, ints_arg, kernel_row, names_arg,
                     shapes_arg, sparsities_arg, time_ms)

GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (768, 3072))
GPU_MS = (1, 4, 16, 64, 256)
CPU_SHAPES = ((768, 3072),)
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
DENSE_PROVIDERS = ("dense", "dense_compile")
PROVIDERS = ("dense", "dense_compile", "torch_csr", "torch_bsr_triton", "sparsecore_triton", "sparsecore_sell",
             "reference")
OWN = ("sparsecore_triton", "sparsecore_sell", "reference")  # a failure of one is a bug: the bench exits 1

Provider = Callable[[torch.Tensor], torch.Tensor]


def copy_bandwidth_gb_s(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), the memory roofline."""
    n = 256 * 2**20 if device.type == "cuda" else 16 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def _tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def build_providers(packed: UnstructuredWeight, w: torch.Tensor, wanted: Sequence[str] = PROVIDERS
                    ) -> tuple[dict[str, tuple[Provider, int]], dict[str, str]]:
    """``{name: (fn(x), weight bytes it streams)}`` for one weight, and ``{name: reason}`` for each wanted
    provider that does not apply here (``not run: ...``) or failed to build (its exception)."""
    cuda = w.is_cuda
    ready: dict[str, tuple[Provider, int]] = {}
    skipped: dict[str, str] = {}

    def build(name: str, make: Callable[[], tuple[Provider, int] | str]) -> None:
        if name not in wanted:
            return
        try:
            made = make()
        except Exception as e:  # noqa: BLE001  (recorded as this provider's error row)
            skipped[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            return
        if isinstance(made, str):
            skipped[name] = NOT_RUN + made
        else:
            ready[name] = made

    def compiled() -> tuple[Provider, int] | str:
        if not cuda:
            return "GPU only (CPU subset proves the command runs)"
        torch._dynamo.reset()  # F.linear is one code object: without a reset the recompile limit hits
        fn = torch.compile(F.linear, dynamic=False)
        return (lambda x: fn(x, w)), _tensor_bytes(w)

    def csr() -> tuple[Provider, int]:
        w_csr = w.to_sparse_csr()
        return ((lambda x: torch.sparse.mm(w_csr, x.t().contiguous()).t()),
                _tensor_bytes(w_csr.crow_indices(), w_csr.col_indices(), w_csr.values()))

    def bsr() -> tuple[Provider, int] | str:
        if not cuda:
            return "GPU only"
        from torch.sparse._triton_ops import bsr_dense_mm
        w_bsr = w.to_sparse_bsr((16, 16))
        return ((lambda x: bsr_dense_mm(w_bsr, x.t().contiguous()).t()),
                _tensor_bytes(w_bsr.crow_indices(), w_bsr.col_indices(), w_bsr.values()))

    def bitmap() -> tuple[Provider, int] | str:
        if not cuda:
            return "GPU only (interpreter timings mean nothing)"
        from sparsecore.kernels.spmm import spmm
        return ((lambda x: spmm(x, packed.bitmap, packed.values, packed.tile_offsets, packed.n, k=packed.shape[1])),
                packed.nbytes)

    def sell() -> tuple[Provider, int] | str:
        if not cuda:
            return "GPU only (interpreter timings mean nothing)"
        from sparsecore.formats.sell import pack_sell
        from sparsecore.kernels.sell_matmul import check_layout, sell_matmul
        layout = pack_sell(w, packed.mask())
        check_layout(layout)
        return (lambda x: sell_matmul(x, layout)), layout.nbytes

    def reference() -> tuple[Provider, int]:
        from sparsecore.kernels.spmm import spmm_ref
        return ((lambda x: spmm_ref(x, packed.bitmap, packed.values, packed.tile_offsets, packed.n)),
                packed.nbytes)

    for name, make in (("dense", lambda: ((lambda x: F.linear(x, w)), _tensor_bytes(w))),
                       ("dense_compile", compiled), ("torch_csr", csr), ("torch_bsr_triton", bsr),
                       ("sparsecore_triton", bitmap), ("sparsecore_sell", sell), ("reference", reference)):
        build(name, make)
    return ready, skipped


def bench_case(n: int, k: int, m: int, sparsity: float, dtype: torch.dtype, device: torch.device,
               copy_bw: float, packed: UnstructuredWeight, w: torch.Tensor, env: dict[str, str],
               ready: dict[str, tuple[Provider, int]], skipped: dict[str, str]) -> list[dict]:
    """Rows for one (shape, M, sparsity): every provider timed on the same x; a provider that raises (or
    was ``skipped``) gets a row with the reason in ``error``."""
    g = torch.Generator(device=device).manual_seed(m)
    x = torch.randn(m, k, generator=g, device=device, dtype=dtype)
    ref = (x.float() @ w.float().t())
    case = {"N": n, "K": k, "M": m, "sparsity_pct": round(100 * sparsity), "dtype": str(dtype).split(".")[-1]}
    errors = [error_row(case, name, reason, env) for name, reason in skipped.items()]
    for name, reason in skipped.items():
        print(f"  {'skip' if reason.startswith(NOT_RUN) else '!! error'} {name}: {reason}")
    timings: dict[str, tuple[float, int, float]] = {}
    for name, (fn, weight_bytes) in ready.items():
        try:
            out = fn(x)  # first call: compile / autotune, kept out of the timed loop
            err = float((out.float() - ref).abs().max()) if out.numel() else 0.0
            timings[name] = (time_ms(lambda: fn(x), device), weight_bytes, err)
        except Exception as e:  # noqa: BLE001  (one provider's failure is one row, not a lost run)
            print(f"  !! error {name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
            errors.append(error_row(case, name, e, env))
    dense = [timings[d][0] for d in DENSE_PROVIDERS if d in timings]
    best_dense = min(dense) if dense else float("nan")
    rows = []
    io_bytes = _tensor_bytes(x) + m * n * x.element_size()
    useful_flop = 2 * m * packed.nnz  # multiply-adds on kept weights only
    for name, (ms, weight_bytes, err) in timings.items():
        moved = weight_bytes + io_bytes
        row = kernel_row(case, name, ms, best_dense, moved_bytes=moved, dense_flop=2.0 * m * n * k, max_abs_err=err,
                         env=env, pct_of_copy_bw=100 * moved / ms / 1e6 / copy_bw,
                         useful_TFLOP_per_s=useful_flop / ms / 1e9, weight_bytes_per_dense_elem=weight_bytes / (n * k))
        rows.append(row)
        print(f"  {name:18s} {ms:9.4f} ms  {best_dense / ms:5.2f}x  {row['GB_per_s']:7.1f} GB/s  "
              f"{weight_bytes / (n * k):.3f} B/elem  err {err:.2e}")
    return rows + errors


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("bench.bench_spmm", __doc__.splitlines()[0], "small subset")
    ap.add_argument("--shapes", type=shapes_arg, help="weights NxK (out x in), e.g. 4096x4096,11008x4096")
    ap.add_argument("--ms", type=ints_arg, help="activation rows, e.g. 1,16")
    ap.add_argument("--sparsities", type=sparsities_arg, help="percent pruned, e.g. 50,70,90,95")
    ap.add_argument("--providers", type=names_arg(PROVIDERS), default=list(PROVIDERS),
                    help=f"subset of {','.join(PROVIDERS)} (default all; dense is always timed)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        dtype = torch.float16
        shapes, ms, sparsities = GPU_SHAPES, GPU_MS, SPARSITIES
        if args.quick:
            shapes, ms, sparsities = GPU_SHAPES[:1], (1, 16), (0.5, 0.9)
    else:
        print("no CUDA device: CPU subset (fp32 dense vs torch CSR vs reference); GPU providers skipped")
        dtype = torch.float32
        shapes, ms, sparsities = CPU_SHAPES, ((1,) if args.quick else (1, 16)), (0.9,) if args.quick else (0.5, 0.9)
    shapes, ms, sparsities = args.shapes or shapes, args.ms or ms, args.sparsities or sparsities
    wanted = ["dense"] + [v for v in args.providers if v != "dense"]  # the speedup needs the dense row
    copy_bw = copy_bandwidth_gb_s(device)
    env = env_info(device)
    print(f"device {env['device']}: copy bandwidth {copy_bw:.0f} GB/s")
    table = Table("spmm", device, args.out_dir)
    for n, k in shapes:
        g = torch.Generator(device=device).manual_seed(n * k)
        w_full = torch.randn(n, k, generator=g, device=device, dtype=dtype)
        for sparsity in sparsities:
            mask = torch.rand(n, k, generator=g, device=device) >= sparsity
            packed = UnstructuredWeight.from_dense(w_full, mask)
            w = packed.to_dense()
            ready, skipped = build_providers(packed, w, wanted)
            for m in ms:
                print(f"[{n}x{k}] M={m} sparsity={sparsity:.0%} {dtype}")
                table.add(bench_case(n, k, m, sparsity, dtype, device, copy_bw, packed, w, env, ready, skipped))
    print(f"wrote {table.path}")
    bad = failed(table.rows, OWN)
    if bad:
        print(f"!! {len(bad)} sparsecore provider error(s): {sorted({r['provider'] for r in bad})}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
