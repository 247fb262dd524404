"""N:M (2:4) linear benchmark: ``python -m bench.bench_nm [--quick] [--dtype bf16]``.

Providers (all on the same masked weight, timed in the same run):
* ``dense``: ``F.linear`` on the masked dense weight (cuBLAS);
* ``dense_compile``: the same under ``torch.compile`` (default mode; compile time reported apart);
* ``cusparselt`` / ``cutlass``: PyTorch 2:4 semi-structured tensors (skipped with the reason where they
  cannot run, e.g. PyTorch's CUTLASS 2:4 kernels are built for compute capability 8.x only);
* ``triton_nm``: ``sparsecore.kernels.nm_matmul`` (autotuned; tuning happens in a warm-up call);
* ``reference``: ``nm_matmul_ref`` (pure torch; unpacks the weight on every call).

Columns (vocabulary in ``bench.common``): ``time_ms`` (median), ``best_dense_time_ms`` (best of
dense/dense_compile in this run) and ``speedup_vs_best_dense`` (that over ``time_ms``), ``GB_per_s``
((weight bytes the provider streams + x + y) / time; packed bytes for the sparse providers),
``TFLOP_per_s`` (dense-equivalent 2*M*N*K / time), ``max_abs_err`` against the dense fp32 product,
``first_call_ms`` (compile / autotune / cache building, kept out of ``time_ms``), ``error`` (a provider that
raised or does not apply here: a row with the reason and no timing; the bench carries on, and exits 1 when one
of sparsecore's own providers raised). ``--shapes``, ``--ms``, ``--providers`` pick the cases; the table is
rewritten after every case. On a CPU the command runs a tiny subset (dense and reference) to prove it works.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bench.common import (NOT_RUN, Table, bench_parser, env_info, error_row, failed, ints_arg, kernel_row,
                          names_arg, shapes_arg, time_ms)
from sparsecore.backends import Backend
from sparsecore.backends.nm import torch_24_why_not
from sparsecore.formats import NMWeight
from sparsecore.masks import keep_n_of_m

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (N, K) = (out, in)
MS = [1, 4, 16, 64, 256, 2048, 8192]
QUICK_SHAPES, QUICK_MS = SHAPES[:2], [1, 16, 2048]
CPU_SHAPES, CPU_MS = [(256, 512)], [1, 16]
DENSE = ("dense", "dense_compile")


PROVIDERS = ("dense", "dense_compile", "cusparselt", "cutlass", "triton_nm", "reference")
OWN = ("triton_nm", "reference")  # sparsecore's providers: a failure of one is a bug (the bench exits 1)


def _providers(p: NMWeight, w: torch.Tensor, x_example: torch.Tensor, compile_ok: bool, wanted: Sequence[str]
               ) -> tuple[dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]], dict[str, str]]:
    """name -> (fn(x), weight bytes it streams), and name -> reason for each wanted provider that cannot run
    here (``not run: ...``) or failed to build (its exception)."""
    from sparsecore.kernels.nm_matmul import nm_matmul, nm_matmul_ref

    dense_bytes = w.numel() * w.element_size()
    run: dict[str, tuple[Callable, int]] = {}
    skipped: dict[str, str] = {}

    def build(name: str, make: Callable[[], tuple[Callable, int] | str]) -> None:
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
            run[name] = made

    def compiled() -> tuple[Callable, int] | str:
        if not compile_ok:
            return "torch.compile is only benchmarked on CUDA"
        # A fresh dynamo state per (shape, M): otherwise recompiles hit the cache-size limit and the
        # "compiled" provider silently runs eager.
        torch._dynamo.reset()
        return torch.compile(lambda x: F.linear(x, w)), dense_bytes

    def torch_24(backend: Backend) -> tuple[Callable, int] | str:
        reason = torch_24_why_not(backend, p, x_example)
        if reason is not None:
            return reason
        w_sparse = p.to_torch_semi_structured(backend.value)
        return (lambda x: F.linear(x, w_sparse)), p.nbytes

    def triton() -> tuple[Callable, int] | str:
        if not x_example.is_cuda:
            return "Triton needs CUDA (the CPU interpreter is for tests, not timing)"
        return (lambda x: nm_matmul(x, p.values, p.positions, p.n, p.m)), p.nbytes

    build("dense", lambda: ((lambda x: F.linear(x, w)), dense_bytes))
    build("dense_compile", compiled)
    build(Backend.CUSPARSELT.value, lambda: torch_24(Backend.CUSPARSELT))
    build(Backend.CUTLASS.value, lambda: torch_24(Backend.CUTLASS))
    build("triton_nm", triton)
    build("reference", lambda: ((lambda x: nm_matmul_ref(x, p.values, p.positions, p.n, p.m)), p.nbytes))
    return run, skipped


def bench_shape(n_out: int, k_dim: int, ms: list[int], dtype: torch.dtype, device: torch.device,
                n: int, m: int, table: Table, wanted: Sequence[str] = PROVIDERS) -> list[dict]:
    """Rows of one weight shape at every M, each M added to ``table`` (written) as soon as it is timed."""
    g = torch.Generator().manual_seed(n_out * 31 + k_dim)
    w = torch.randn(n_out, k_dim, generator=g).to(dtype)
    mask = keep_n_of_m(w.abs().float(), n, m)
    p = NMWeight.from_dense(w, mask, n=n, m=m).to(device)
    w_dense = p.to_dense()
    env = env_info(device)
    rows = []
    for m_rows in ms:
        x = torch.randn(m_rows, k_dim, generator=g).to(dtype).to(device)
        exact = F.linear(x.float(), w_dense.float())
        case = {"N": n_out, "K": k_dim, "M": m_rows, "pattern": f"{n}:{m}", "sparsity_pct": round(100 * (1 - n / m)),
                "dtype": str(dtype).removeprefix("torch.")}
        providers, skipped = _providers(p, w_dense, x, device.type == "cuda", wanted)
        case_rows, error_rows = [], [error_row(case, name, reason, env) for name, reason in skipped.items()]
        for name, reason in skipped.items():
            print(f"  {'skip' if reason.startswith(NOT_RUN) else '!! error'} {name} at N={n_out} K={k_dim} "
                  f"M={m_rows}: {reason}")
        times, errs, warm = {}, {}, {}
        for name, (fn, _) in providers.items():
            try:
                start = time.perf_counter()
                out = fn(x)  # first call timed apart: compiles, autotunes, builds caches
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                warm[name] = (time.perf_counter() - start) * 1e3
                errs[name] = float((out.float() - exact).abs().max())
                times[name] = time_ms(lambda: fn(x), device)
            except Exception as e:  # noqa: BLE001  (one provider's failure is one row, not a lost run)
                print(f"  !! error {name} at N={n_out} K={k_dim} M={m_rows}: {type(e).__name__}: {e}")
                error_rows.append(error_row(case, name, e, env))
        dense_times = [times[d] for d in DENSE if d in times]
        best_dense = min(dense_times) if dense_times else float("nan")
        io_bytes = (x.numel() + m_rows * n_out) * x.element_size()
        for name, (_, w_bytes) in providers.items():
            if name not in times:
                continue
            t = times[name]
            case_rows.append(kernel_row(case, name, t, best_dense, moved_bytes=w_bytes + io_bytes,
                                        dense_flop=2.0 * m_rows * n_out * k_dim, max_abs_err=errs[name], env=env,
                                        first_call_ms=warm[name]))
            print(f"  N={n_out:6d} K={k_dim:6d} M={m_rows:5d} {name:14s} {t:10.4f} ms  "
                  f"x{best_dense / t:5.2f}  err {errs[name]:.2e}")
        table.add(case_rows + error_rows)
        rows += case_rows + error_rows
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("bench.bench_nm", __doc__.splitlines()[0], "2 shapes x M in {1, 16, 2048} (implied on CPU)")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--pattern", default="2:4", help="n:m, e.g. 2:4 (default), 1:4, 2:8, 4:8")
    ap.add_argument("--shapes", type=shapes_arg, help="weights NxK (out x in), e.g. 4096x4096,11008x4096")
    ap.add_argument("--ms", type=ints_arg, help="activation rows, e.g. 1,4,16,2048")
    ap.add_argument("--providers", type=names_arg(PROVIDERS), default=list(PROVIDERS),
                    help=f"subset of {','.join(PROVIDERS)} (default all; dense is always timed)")
    args = ap.parse_args(argv)
    n, m = (int(v) for v in args.pattern.split(":"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("no CUDA device: tiny CPU subset (dense and reference) only; GPU providers are skipped")
        shapes, ms = CPU_SHAPES, CPU_MS
        dtype = torch.float32 if dtype == torch.float16 else dtype  # CPU half matmul is not a fair baseline
    elif args.quick:
        shapes, ms = QUICK_SHAPES, QUICK_MS
    else:
        shapes, ms = SHAPES, MS
    shapes, ms = args.shapes or shapes, args.ms or ms
    wanted = ["dense"] + [v for v in args.providers if v != "dense"]  # the speedup needs the dense row
    table = Table(f"nm_matmul_{n}x{m}_{str(dtype).removeprefix('torch.')}", device, args.out_dir)
    for n_out, k_dim in shapes:
        bench_shape(n_out, k_dim, ms, dtype, device, n, m, table, wanted)
    print(f"wrote {table.path}")
    bad = failed(table.rows, OWN)
    if bad:
        print(f"!! {len(bad)} sparsecore provider error(s): {sorted({r['provider'] for r in bad})}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
