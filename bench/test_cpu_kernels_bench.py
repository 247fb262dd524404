"""pytest-benchmark regressions for the CPU linear providers: 2048 x 2048 fp32 at 90%, M = 1 (decode) and
M = 128 (prefill: the tiled M > 1 kernels).

    python -m pytest bench/ --benchmark-only          # not collected by `python -m pytest` (testpaths = tests)

Every provider that ``bench.cpu_providers`` builds for the case (dense, CPU peers, each registered sparsecore
backend and the planner's choice) is one benchmark; compare runs with ``--benchmark-compare``. The full,
interleaved measurement with spreads and byte ceilings is ``python -m bench.bench_cpu``.
"""
import os

import pytest
import torch

from bench.bench_cpu import Case, make_weight
from bench.cpu_providers import all_providers

os.environ.pop("TRITON_INTERPRET", None)  # Triton on CPU would time its interpreter
CASES = (Case(2048, 2048, 1, "90", torch.float32), Case(2048, 2048, 128, "90", torch.float32))


def _providers(case: Case) -> list:
    w, packed = make_weight(case)
    x = torch.randn(case.m, case.k, generator=torch.Generator().manual_seed(0))
    return [(case, w, x, p) for p in all_providers(w, packed, x, plan_rep=5)[0]]


ENTRIES = [e for case in CASES for e in _providers(case)]


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"M{e[0].m}-{e[3].name}" for e in ENTRIES])
def test_linear_provider(benchmark, entry):
    case, w, x, provider = entry
    benchmark.extra_info.update(weight_bytes=provider.nbytes, detail=provider.detail, threads=torch.get_num_threads(),
                                m=case.m)
    y = benchmark(provider.fn)
    ref = x.double() @ w.double().t()
    assert float((y.double() - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
