"""pytest-benchmark regressions for the CPU linear providers at one shape (2048 x 2048, M = 1, fp32, 90%).

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
CASE = Case(2048, 2048, 1, "90", torch.float32)
_W, _PACKED = make_weight(CASE)
_X = torch.randn(CASE.m, CASE.k, generator=torch.Generator().manual_seed(0))
PROVIDERS, SKIPPED = all_providers(_W, _PACKED, _X, plan_rep=5)


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
def test_linear_provider(benchmark, provider):
    benchmark.extra_info.update(weight_bytes=provider.nbytes, detail=provider.detail, threads=torch.get_num_threads())
    y = benchmark(provider.fn)
    ref = _X.double() @ _W.double().t()
    assert float((y.double() - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
