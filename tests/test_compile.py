"""Sparse modules under torch.compile(fullgraph=True): same output as eager, no graph break."""
import pytest
import torch
from torch import nn

import sparsecore as sc


@pytest.mark.parametrize("backend", ["dense", "torch_csr", "auto"])
def test_compile_fullgraph_matches_eager(backend, seeded, tmp_path):
    torch._dynamo.reset()
    model = sc.sparsify(nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 9)),
                        sc.SparsityConfig("unstructured", 0.8, backend=backend))
    x = torch.randn(3, 48, generator=seeded)
    with torch.no_grad():
        if backend == "auto":
            sc.plan(model, (x,), cache_path=tmp_path / "plan.json", rep=3)
        eager = model(x)  # first eager call prepares backend state; compile after it
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
