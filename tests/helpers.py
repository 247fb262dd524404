"""Shared test helpers: tolerances, random sparse data, float64 references."""
from __future__ import annotations

import os

import pytest
import torch

# atol grows with sqrt(K) (random-walk accumulation of rounding); rtol is the dtype's.
_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 5e-2)}


def tolerance(dtype: torch.dtype, k: int) -> tuple[float, float]:
    """(atol, rtol) for comparing a reduction of length ``k`` in ``dtype`` against float64."""
    atol_unit, rtol = _TOL[dtype]
    return atol_unit * max(1.0, k ** 0.5), rtol


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, k: int) -> None:
    """Compare ``out`` against a float64 reference with the dtype's K-scaled tolerance; NaN fails."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert bool(torch.isfinite(out).all()), "output has NaN/Inf (unwritten or overflowed elements)"
    atol, rtol = tolerance(out.dtype, k)
    torch.testing.assert_close(out.double(), ref64, atol=atol, rtol=rtol)


def nonzero_randn(*shape: int, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normal values pushed away from zero so kept weights are never zero (|v| >= 0.1)."""
    v = torch.randn(*shape, generator=generator, dtype=torch.float64)
    v = torch.where(v >= 0, v + 0.1, v - 0.1)
    return v.to(dtype)


@pytest.fixture
def poisoned():
    """Every buffer a kernel launcher allocates starts as NaN, so unwritten elements fail the comparison."""
    from sparsecore.kernels._host import poisoned_buffers

    with poisoned_buffers():
        yield


@pytest.fixture
def seeded(request) -> torch.Generator:
    """A freshly seeded generator per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    print(f"{request.node.nodeid}: seed={seed}")  # shown by pytest when the test fails
    g = torch.Generator()
    g.manual_seed(seed)
    return g
