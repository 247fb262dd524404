"""Where sparsecore's torch-CSR path spends time beyond torch CSR itself (``cpu_csr_overhead_*.{csv,md}``).

Per (shape, M), on one 90%-sparse fp32 weight, timed together (``bench.cpu_stats``), each step adding one
cost to the one before:

* ``direct``: ``torch.sparse.mm(W_csr, x.t()).t()`` on a CSR tensor built once (what a user would write);
* ``direct+contiguous``: the same, output made contiguous (the backend contract returns ``[M, N]`` rows);
* ``build_per_call``: the CSR tensor rebuilt from its arrays on every call;
* ``custom_op_before``: the previous backend body, i.e. build per call + ``sparse.mm`` + ``y + bias`` +
  contiguous inside a ``torch.library`` custom op (re-declared here as ``sparsecore_bench::csr_linear_before``);
* ``backend_run``: today's ``torch_csr`` backend ``run`` (eager: the prepared CSR tensor, no custom op);
* ``module``: ``SparseLinear`` forced to ``torch_csr`` (adds the module's checks and dispatch).

``overhead_vs_direct_pct`` = ``100 * (time / direct - 1)`` on the medians; ``paired_overhead_pct`` is the median
over rounds of ``100 * (sample / direct sample - 1)``, each round timing every step back to back, so that the
machine's drift cancels out of each ratio (``paired_q25_pct`` / ``paired_q75_pct`` its quartiles). Issue #12
asks for the backend within 5%.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

import sparsecore as sc
from sparsecore.backends import Backend
from sparsecore.backends.registry import lookup
from sparsecore.timing import interleaved_samples_ms, quantiles

from .common import PROVIDER, TIME_MS, cpu_info, env_info, write_table
from .cpu_stats import Timing

# 256x256: the per-call (host) cost alone, where the product itself takes microseconds
SHAPES = ((256, 256), (4096, 4096), (11008, 4096))
MS = (1, 8, 64)
QUICK = (((256, 256), (4096, 4096)), (1, 8))


@torch.library.custom_op("sparsecore_bench::csr_linear_before", mutates_args=())
def csr_linear_before(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                      bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """The torch-CSR backend body before this benchmark's fix: the baseline of the before/after table."""
    w = torch.sparse_csr_tensor(crow, col, values, (n, x.shape[1]), check_invariants=False)
    y = torch.sparse.mm(w, x.t()).t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


def steps(n: int, k: int, m: int, sparsity: float = 0.9) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed steps of the module docstring on a fresh ``[n, k]`` weight and ``x [m, k]``, outputs checked."""
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g)
    packed = sc.pack(w, torch.rand(n, k, generator=g) >= sparsity, "unstructured")
    x = torch.randn(m, k, generator=g)
    mod = sc.SparseLinear(packed, None, backend=Backend.TORCH_CSR)
    impl = lookup("linear", Backend.TORCH_CSR.value, "unstructured")
    state = mod.prepared(impl)
    crow, col, values = state.crow, state.col, state.values
    w_csr = torch.sparse_csr_tensor(crow, col, values, (n, k), check_invariants=False)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    fns = {
        "direct": lambda: torch.sparse.mm(w_csr, x.t()).t(),
        "direct+contiguous": lambda: torch.sparse.mm(w_csr, x.t()).t().contiguous(),
        "build_per_call": lambda: torch.sparse.mm(torch.sparse_csr_tensor(crow, col, values, (n, k),
                                                                          check_invariants=False), x.t()).t(),
        "custom_op_before": lambda: csr_linear_before(crow, col, values, x, None, n),
        "backend_run": lambda: impl.run(state, x, None),
        "module": no_grad(lambda: mod(x)),
    }
    ref = x.double() @ packed.to_dense().double().t()
    for name, fn in fns.items():
        err = float((fn().double() - ref).abs().max())
        if not err <= 1e-3 * max(1.0, float(ref.abs().max())):
            raise AssertionError(f"{name}: output differs from the float64 reference by {err}")
    return fns


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict]:
    shapes, ms = QUICK if args.quick else (SHAPES, MS)
    env = {**cpu_info(), **env_info("cpu")}
    rows = []
    for n, k in shapes:
        for m in ms:
            log(f"[csr overhead] {n}x{k} M={m} 90% fp32")
            fns = steps(n, k, m)
            samples: dict[str, list[float]] = {name: [] for name in fns}
            medians: dict[str, list[float]] = {name: [] for name in fns}
            for r in range(args.repeats):
                got = interleaved_samples_ms(fns, warmup=2 if r == 0 else 1, rounds=args.reps)
                for name, got_ms in got.items():
                    samples[name] += got_ms
                    medians[name].append(statistics.median(got_ms))
            direct = statistics.median(medians["direct"])
            for name in fns:
                t = Timing(tuple(medians[name]), args.reps)
                q25, q50, q75 = quantiles([100 * (a / b - 1) for a, b in zip(samples[name], samples["direct"])])
                rows.append({"N": n, "K": k, "M": m, "sparsity_pct": 90, "dtype": "float32", PROVIDER: name,
                             TIME_MS: t.median_ms, "time_min_ms": t.min_ms, "time_max_ms": t.max_ms,
                             "spread_pct": t.spread_pct, "repeats": len(t.medians_ms), "reps": t.reps,
                             "overhead_vs_direct_pct": 100 * (t.median_ms / direct - 1),
                             "paired_overhead_pct": q50, "paired_q25_pct": q25, "paired_q75_pct": q75, **env})
                log(f"    {name:18s} {t.median_ms:9.3f} ms [{t.min_ms:.3f}-{t.max_ms:.3f}]  "
                    f"{rows[-1]['overhead_vs_direct_pct']:+6.1f}% vs direct, paired {q50:+6.1f}% "
                    f"[{q25:+.1f}, {q75:+.1f}]")
            path = write_table("cpu_csr_overhead" + args.suffix, rows, "cpu", args.out_dir)
    log(f"wrote {path}")
    return rows
