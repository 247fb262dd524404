"""Kernel benchmark: unstructured sparse weight x dense activations, every provider in one run.

    python -m bench.bench_spmm [--quick] [--out-dir DIR]

GPU (fp16): weights [N, K] = 4096x4096, 11008x4096, 4096x11008 (LLaMA-class) and 768x3072 (BERT-base
FFN down), M in {1, 4, 16, 64, 256}, random unstructured masks at 50/70/90/95% sparsity. Providers:
dense F.linear (cuBLAS), dense under torch.compile, torch CSR (cuSPARSE), torch BSR Triton
(``torch.sparse._triton_ops.bsr_dense_mm``, 16x16 blocks), sparsecore Triton ``spmm`` on the tiled bitmap
(``sparsecore_triton``) and ``sell_matmul`` on the sliced-ELL layout (``sparsecore_sell``; both autotuned,
the tuning runs in the warm-up, not in the timed loop) and the torch reference. ``--quick``: 4096x4096,
M in {1, 16}, 50 and 90%.
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
from typing import Callable

import torch
import torch.nn.functional as F

from sparsecore.formats import UnstructuredWeight

from .common import bench_parser, best_dense_ms, env_info, kernel_row, time_ms, write_table

GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (768, 3072))
GPU_MS = (1, 4, 16, 64, 256)
CPU_SHAPES = ((768, 3072),)
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
DENSE_PROVIDERS = ("dense", "dense_compile")
# Providers from outside sparsecore: a failure is printed and the provider skipped for that case. A
# failure of sparsecore's own providers is a bug and propagates.
EXTERNAL = ("dense_compile", "torch_csr", "torch_bsr_triton")

Provider = Callable[[], torch.Tensor]


def copy_bandwidth_gb_s(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), the memory roofline."""
    n = 256 * 2**20 if device.type == "cuda" else 16 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def _tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def build_providers(packed: UnstructuredWeight, w: torch.Tensor, x: torch.Tensor,
                    ) -> tuple[dict[str, tuple[Provider, int]], dict[str, str]]:
    """``{name: (fn, weight bytes it streams)}`` and ``{name: reason}`` for the providers that cannot run."""
    cuda = x.is_cuda
    ready: dict[str, tuple[Provider, int]] = {}
    skipped: dict[str, str] = {}
    ready["dense"] = (lambda: F.linear(x, w), _tensor_bytes(w))
    if cuda:
        torch._dynamo.reset()  # F.linear is one code object: without a reset the recompile limit hits
        compiled = torch.compile(F.linear, dynamic=False)
        ready["dense_compile"] = (lambda: compiled(x, w), _tensor_bytes(w))
    else:
        skipped["dense_compile"] = "GPU only (CPU subset proves the command runs)"

    try:
        w_csr = w.to_sparse_csr()
        ready["torch_csr"] = (lambda: torch.sparse.mm(w_csr, x.t().contiguous()).t(),
                              _tensor_bytes(w_csr.crow_indices(), w_csr.col_indices(), w_csr.values()))
    except (RuntimeError, NotImplementedError) as e:
        skipped["torch_csr"] = f"to_sparse_csr failed: {e}"

    if cuda:
        try:
            from torch.sparse._triton_ops import bsr_dense_mm
            w_bsr = w.to_sparse_bsr((16, 16))
            ready["torch_bsr_triton"] = (lambda: bsr_dense_mm(w_bsr, x.t().contiguous()).t(),
                                         _tensor_bytes(w_bsr.crow_indices(), w_bsr.col_indices(), w_bsr.values()))
        except (ImportError, RuntimeError, NotImplementedError, ValueError) as e:
            skipped["torch_bsr_triton"] = f"unavailable: {type(e).__name__}: {e}"
        from sparsecore.kernels.spmm import spmm
        ready["sparsecore_triton"] = (lambda: spmm(x, packed.bitmap, packed.values, packed.tile_offsets, packed.n,
                                                   k=packed.shape[1]),
                                      packed.nbytes)
        from sparsecore.formats.sell import pack_sell
        from sparsecore.kernels.sell_matmul import check_layout, sell_matmul
        layout = pack_sell(w, packed.mask())
        check_layout(layout)
        ready["sparsecore_sell"] = (lambda: sell_matmul(x, layout), layout.nbytes)
    else:
        skipped["torch_bsr_triton"] = "GPU only"
        skipped["sparsecore_triton"] = "GPU only (interpreter timings mean nothing)"
        skipped["sparsecore_sell"] = "GPU only (interpreter timings mean nothing)"

    from sparsecore.kernels.spmm import spmm_ref
    ready["reference"] = (lambda: spmm_ref(x, packed.bitmap, packed.values, packed.tile_offsets, packed.n),
                          packed.nbytes)
    return ready, skipped


def bench_case(n: int, k: int, m: int, sparsity: float, dtype: torch.dtype, device: torch.device,
               copy_bw: float, packed: UnstructuredWeight, w: torch.Tensor, env: dict[str, str]) -> list[dict]:
    """Rows for one (shape, M, sparsity): every provider timed on the same x."""
    g = torch.Generator(device=device).manual_seed(m)
    x = torch.randn(m, k, generator=g, device=device, dtype=dtype)
    ref = (x.float() @ w.float().t())
    ready, skipped = build_providers(packed, w, x)
    for name, reason in skipped.items():
        print(f"  skip {name}: {reason}")
    timings: dict[str, tuple[float, int, float]] = {}
    for name, (fn, weight_bytes) in ready.items():
        try:
            out = fn()  # first call: compile / autotune, kept out of the timed loop
        except Exception as e:  # noqa: BLE001  (reported, and only for providers outside sparsecore)
            if name not in EXTERNAL:
                raise
            print(f"  skip {name}: failed on this case: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
            continue
        err = float((out.float() - ref).abs().max()) if out.numel() else 0.0
        timings[name] = (time_ms(fn, device), weight_bytes, err)
    best_dense = best_dense_ms({name: t[0] for name, t in timings.items()}, DENSE_PROVIDERS)
    rows = []
    io_bytes = _tensor_bytes(x) + m * n * x.element_size()
    useful_flop = 2 * m * packed.nnz  # multiply-adds on kept weights only
    case = {"N": n, "K": k, "M": m, "sparsity_pct": round(100 * sparsity), "dtype": str(dtype).split(".")[-1]}
    for name, (ms, weight_bytes, err) in timings.items():
        moved = weight_bytes + io_bytes
        row = kernel_row(case, name, ms, best_dense, moved_bytes=moved, dense_flop=2.0 * m * n * k, max_abs_err=err,
                         env=env, pct_of_copy_bw=100 * moved / ms / 1e6 / copy_bw,
                         useful_TFLOP_per_s=useful_flop / ms / 1e9, weight_bytes_per_dense_elem=weight_bytes / (n * k))
        rows.append(row)
        print(f"  {name:18s} {ms:9.4f} ms  {best_dense / ms:5.2f}x  {row['GB_per_s']:7.1f} GB/s  "
              f"{weight_bytes / (n * k):.3f} B/elem  err {err:.2e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = bench_parser("bench.bench_spmm", __doc__.splitlines()[0], "small subset").parse_args(argv)
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
    copy_bw = copy_bandwidth_gb_s(device)
    env = env_info(device)
    print(f"device {env['device']}: copy bandwidth {copy_bw:.0f} GB/s")
    rows = []
    for n, k in shapes:
        g = torch.Generator(device=device).manual_seed(n * k)
        w_full = torch.randn(n, k, generator=g, device=device, dtype=dtype)
        for sparsity in sparsities:
            mask = torch.rand(n, k, generator=g, device=device) >= sparsity
            packed = UnstructuredWeight.from_dense(w_full, mask)
            w = packed.to_dense()
            for m in ms:
                print(f"[{n}x{k}] M={m} sparsity={sparsity:.0%} {dtype}")
                rows += bench_case(n, k, m, sparsity, dtype, device, copy_bw, packed, w, env)
    path = write_table("spmm", rows, device, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
