"""Sparse modules under torch.compile(fullgraph=True): no graph break, output equals the float64 masked model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from helpers import assert_close_to_ref


@pytest.mark.parametrize("backend", ["dense", "torch_csr", "auto"])
def test_compile_fullgraph_matches_float64_reference(backend, seeded, tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 9))
    config = sc.SparsityConfig("unstructured", 0.8, backend=backend)
    masks = sc.magnitude_masks(model, config)
    w = {f: torch.where(masks[f], model.get_submodule(f).weight, 0).double() for f in masks}
    b = {f: model.get_submodule(f).bias.double() for f in masks}
    sc.sparsify(model, config, masks=masks)
    x = torch.randn(3, 48, generator=seeded)
    ref = F.linear(F.relu(F.linear(x.double(), w["0"], b["0"])), w["2"], b["2"])
    with torch.no_grad():
        if backend == "auto":
            sc.plan(model, (x,), cache_path=tmp_path / "plan.json", rep=3)
        model(x)  # the first eager call prepares backend state; compile after it
        compiled = torch.compile(model, fullgraph=True)(x)
    assert_close_to_ref(compiled, ref, k=48)
