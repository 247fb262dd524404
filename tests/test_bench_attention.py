"""bench.bench_attention_cpu runs end to end on tiny shapes and records what it timed."""
from __future__ import annotations

import pytest
import torch

from sparsecore.backends.registry import compiler_why_not

kattn = pytest.importorskip("sparsecore.kernels.cpu.attention")


def test_rows_cover_every_provider_and_case():
    if compiler_why_not(torch.empty(0)) is not None:
        pytest.skip("needs a C++ compiler")
    from bench import bench_attention_cpu as b

    rows = b.run([1, 3], heads=2, seq=20, head_dim=16, rounds=3, repeats=2, clock_name="cpu")
    cases = {(r["batch"], r["lengths"]) for r in rows}
    assert cases == {(1, "pad1/8"), (3, "pad1/8"), (3, "uniform")}
    assert sorted(r["provider"] for r in rows if r["batch"] == 1) == sorted(b.PROVIDERS)
    for r in rows:
        assert r["max_abs_err"] < 1e-5, r  # every provider against float64
        assert r["time_min_ms"] <= r["time_ms"] <= r["time_max_ms"]
        assert r["speedup_vs_sdpa"] > 0 and r["ratio_q25"] <= r["ratio_q75"]
