"""Shared test helpers: tolerances, random sparse data, float64 references."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


def rewrite_header(path, edit, sign: bool = True) -> None:
    """Rewrite the sparsecore JSON header of a saved file in place: ``edit(header_dict)`` changes it.

    ``sign=True`` stores the header CRC-32 of the new text, as a file written with that header would have
    (a consistent file from another model or writer); ``sign=False`` leaves the old CRC (a corrupt file).
    """
    import json
    import struct
    import zlib

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    outer = json.loads(raw[8: 8 + n])
    meta = outer["__metadata__"]
    inner = json.loads(meta["sparsecore"])
    edit(inner)
    meta["sparsecore"] = json.dumps(inner)
    if sign:
        meta["sparsecore_header_crc32"] = str(zlib.crc32(meta["sparsecore"].encode()))
    blob = json.dumps(outer).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


class SENet(nn.Module):
    """Channel tracing fixture: an SE-style multiply the tracer cannot see through (c2 and se pinned), a
    ``view(B, -1)`` flatten, a concat into the head ``fc``. ``x [B, 3, 8, 8] -> [B, 5]``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.se = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c3, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6 * 4 * 4 + 8, 5)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = self.c2(a) * torch.sigmoid(self.se(a.mean((2, 3), keepdim=True)))
        c = F.adaptive_avg_pool2d(F.relu(self.c3(a)), 4)
        return self.fc(torch.cat([c.view(c.size(0), -1), b.mean((2, 3))], dim=1))
